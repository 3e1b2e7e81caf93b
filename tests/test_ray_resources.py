"""CPUs and threads follow what the nodes offer: a Train worker's default share is its node's CPUs
divided by the ranks placed there, torch uses the CPUs reserved as threads, the teacher actors use
their `num_cpus` as threads, and an explicit `dist.cpus_per_worker` still wins."""

from __future__ import annotations

import pytest

from promptmm_dist import ray_setup
from promptmm_dist.config import DistConfig
from promptmm_dist.ray_setup import auto_cpus_per_worker, torch_threads

# 2 shards + the teacher group + 1 TeacherWorker = 0.45
AUX = 2 * ray_setup.SHARD_CPUS + ray_setup.TEACHER_MODEL_CPUS + ray_setup.TEACHER_WORKER_CPUS


# ------------------------------------------------------------------ placement arithmetic (no Ray)
def test_one_rank_on_a_16_core_node_gets_the_node_less_the_small_actors():
    cpus = auto_cpus_per_worker([16], 1, AUX, driver_node=0)
    assert cpus == pytest.approx(15.55)
    assert torch_threads(cpus) == 15  # was 1 with the old default of one CPU per worker


def test_ranks_split_a_node_evenly():
    assert auto_cpus_per_worker([16], 4, AUX, driver_node=0) == pytest.approx(3.88)  # 15.55 / 4, down
    # two 16-CPU nodes, 4 ranks: 2 per node; the small actors on the driver's node
    assert auto_cpus_per_worker([16, 16], 4, AUX, driver_node=0) == pytest.approx(7.77)


def test_local_cluster_layout_puts_one_rank_per_worker_node():
    # cluster/local_cluster.py defaults: head 1 CPU (the driver and the small actors), 2 worker nodes of 2
    cpus = auto_cpus_per_worker([1, 2, 2], 2, AUX, driver_node=0, available=5 - 2 * ray_setup.SHARD_CPUS)
    assert cpus == 2.0 and torch_threads(cpus) == 2


def test_head_without_cpus_takes_the_small_actors_from_every_node():
    # a head started with --num-cpus 0 cannot hold the shard/teacher actors: they may land on any node
    cpus = auto_cpus_per_worker([0, 16, 16], 2, AUX, driver_node=0)
    assert cpus == pytest.approx(15.55)
    assert 2 * cpus + AUX <= 32


def test_the_two_cpu_test_machine_still_fits_and_never_rounds_up():
    # tests: ray.init(num_cpus=2), the 2 shard actors already hold 0.2 of it
    one = auto_cpus_per_worker([2], 1, AUX, driver_node=0, available=1.8)
    two = auto_cpus_per_worker([2], 2, AUX, driver_node=0, available=1.8)
    assert one == pytest.approx(1.35) and two == pytest.approx(0.67)
    assert one + AUX <= 1.8 and 2 * two + AUX <= 1.8
    assert torch_threads(one) == torch_threads(two) == 1


def test_overfull_cluster_still_gives_every_worker_a_sliver():
    assert auto_cpus_per_worker([1], 4, 0.9, driver_node=0, available=0.5) == ray_setup.MIN_WORKER_CPUS


@pytest.mark.parametrize("cpus,threads", [(0.25, 1), (1.0, 1), (1.999, 1), (2.0, 2), (15.55, 15)])
def test_torch_threads_are_the_whole_cpus_reserved(cpus, threads):
    assert torch_threads(cpus) == threads


def test_the_default_is_auto_and_a_set_share_must_be_positive():
    from promptmm_dist.config import Config, ConfigError, validate

    cfg = Config()
    assert cfg.dist.cpus_per_worker is None and ray_setup.requested_cpus(cfg.dist) is None
    validate(cfg)  # None (auto) is allowed
    cfg.dist.cpus_per_worker = -1.0
    with pytest.raises(ConfigError, match="dist.cpus_per_worker' must be > 0 or null"):
        validate(cfg)


def test_requested_cpus_unset_or_zero_means_auto():
    assert ray_setup.requested_cpus(DistConfig(cpus_per_worker=None)) is None
    assert ray_setup.requested_cpus(DistConfig(cpus_per_worker=0)) is None
    assert ray_setup.requested_cpus(DistConfig(cpus_per_worker=3)) == 3.0


# ------------------------------------------------------------------------- on the test Ray (2 CPUs)
def test_default_share_on_the_connected_cluster(ray_session):
    """Unset: the 2-CPU test Ray gives one rank what is free after the small actors (>= 1 CPU, so
    one thread); local mode (0 workers) gets the driver node's CPUs the same way."""
    free = float(ray_session.available_resources().get("CPU", 0.0))
    if free < 2.0:
        pytest.skip(f"other tests hold CPUs of the test Ray ({free:g} free)")
    one = ray_setup.cpus_per_worker(DistConfig(num_workers=1, cpus_per_worker=None), AUX)
    local = ray_setup.cpus_per_worker(DistConfig(num_workers=0, cpus_per_worker=None), AUX)
    two = ray_setup.cpus_per_worker(DistConfig(num_workers=2, cpus_per_worker=None), AUX)
    assert one == local == pytest.approx(2 - AUX)
    assert two == pytest.approx((2 - AUX) / 2, abs=0.01) and 2 * two + AUX <= 2.0
    assert torch_threads(one) == 1


def test_explicit_cpus_per_worker_override(ray_session):
    """Set: used as given when it fits, lowered to the fair share when it does not."""
    assert ray_setup.cpus_per_worker(DistConfig(num_workers=1, cpus_per_worker=0.5), AUX) == 0.5
    assert ray_setup.cpus_per_worker(DistConfig(num_workers=2, cpus_per_worker=1.0), AUX) == pytest.approx(0.775)
    assert ray_setup.cpus_per_worker(DistConfig(num_workers=1, cpus_per_worker=8), AUX) == pytest.approx(2 - AUX)


def test_actors_use_their_reserved_cpus_as_threads(ray_session):
    class _ThreadProbe:  # defined here: pickled by value (workers cannot import this test module)
        """What a Ray actor sees: its reserved CPUs -> torch threads, as TeacherWorker does it."""

        def __init__(self) -> None:
            import torch

            from promptmm_dist.ray_setup import actor_threads

            torch.set_num_threads(actor_threads())

        def threads(self) -> int:
            import torch

            return torch.get_num_threads()

    ray = ray_session
    if float(ray.available_resources().get("CPU", 0.0)) < 2.0:
        pytest.skip("the test Ray has fewer than 2 free CPUs")
    two = ray.remote(num_cpus=2)(_ThreadProbe).remote()
    assert ray.get(two.threads.remote(), timeout=120) == 2
    ray.kill(two)
    quarter = ray.remote(num_cpus=ray_setup.TEACHER_WORKER_CPUS)(_ThreadProbe).remote()
    assert ray.get(quarter.threads.remote(), timeout=120) == 1
    ray.kill(quarter)
    assert ray_setup.actor_threads(default=3.0) == 3  # the driver (no reservation): the default


def test_teacher_rank_threads_follow_its_reservation(tmp_path, ray_session):
    """A real TeacherRank given 2 CPUs computes on 2 threads; one built outside Ray keeps 1."""
    from promptmm_dist.data.prepare import ensure_canonical
    from promptmm_dist.distill.teacher_model import TeacherRank
    from promptmm_dist.partition.setup import dataset_spec
    from promptmm_dist.pipeline import teacher_stage
    from tests.helpers import tiny_config, tiny_data

    ray = ray_session
    if float(ray.available_resources().get("CPU", 0.0)) < 2.0:
        pytest.skip("the test Ray has fewer than 2 free CPUs")
    data, cfg = tiny_data(), tiny_config()
    cfg.teacher.epochs = 1
    teacher_stage(data, cfg, tmp_path)
    ckpt = str(tmp_path / "teacher" / "teacher.pt")
    spec = dataset_spec(data, str(ensure_canonical(data, tmp_path / "data")), tmp_path)
    worker = ray.remote(num_cpus=2)(TeacherRank).remote(spec, cfg.to_dict(), ckpt, 1)
    try:
        assert ray.get(worker.resources.remote(), timeout=120) == {"cpus": 2.0, "threads": 2}
    finally:
        ray.kill(worker)
    assert TeacherRank(spec, cfg.to_dict(), ckpt, 1, threads=1).threads == 1
