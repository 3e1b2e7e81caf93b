"""`promptmm tune`: search-space validation, resource plan, teacher grouping, clean early stops, and
end-to-end sweeps (ASHA on a real Tiktok subset; FIFO + teacher pool + resume on synthetic data)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from promptmm_dist.cli import main
from promptmm_dist.config import Config
from promptmm_dist.distill.cache import CacheDirectory
from promptmm_dist.tune import space as S
from promptmm_dist.tune.sweep import TRIAL_CPU, plan_resources

TINY = ["--set", "teacher.epochs=2", "--set", "teacher.embed_dim=16", "--set", "teacher.batch_size=1024",
        "--set", "teacher.lr=0.01", "--set", "student.embed_dim=16", "--set", "student.batch_size=1024",
        "--set", "student.lr=0.01", "--set", "student.neg_sample_num=4"]


def _write(path: Path, obj) -> Path:
    path.write_text(yaml.safe_dump(obj))
    return path


def _rows(out: Path) -> list[dict]:
    with open(out / "trials.csv") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------- no Ray needed

@pytest.mark.timeout(60)
def test_unknown_search_space_key_is_one_line_exit_2(tmp_path, capsys):
    bad = _write(tmp_path / "space.yaml", {"student.tauu": {"loguniform": [0.5, 8]}})
    assert main(["tune", "--search-space", str(bad), "--out", str(tmp_path / "sweep")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "student.tauu" in err[0] and err[0].startswith("promptmm: error:")
    for spec, word in [({"student.tau": {"gaussian": [1, 2]}}, "loguniform"),
                       ({"student.tau": {"loguniform": [0, 8]}}, "positive"),
                       ({"dist.num_workers": {"choice": [1, 2]}}, "cannot be searched"),
                       ({"student": {"choice": [1]}}, "section"),
                       ({"sweep": {"pool": 2}, "student.tau": {"loguniform": [1, 2]}}, "unknown sweep option"),
                       ({"student.epochs": {"uniform": [1, 5]}}, "integer key")]:
        assert main(["tune", "--search-space", str(_write(tmp_path / "s.yaml", spec)),
                     "--out", str(tmp_path / "sweep")]) == 2
        assert word in capsys.readouterr().err
    assert not (tmp_path / "sweep" / "tune").exists()


@pytest.mark.timeout(60)
def test_default_space_covers_prompt_and_kd_on_log_scales():
    space = S.load_space()
    for key in ["prompt.soft_token_rate", "prompt.feat_soft_token_rate", "prompt.prompt_dropout", "prompt.lr",
                "prompt.refresh_epochs", "student.tau", "student.lambda_pair", "student.lambda_list",
                "student.lambda_emb"]:
        assert key in space.params
    for key in ["prompt.soft_token_rate", "prompt.feat_soft_token_rate", "prompt.lr", "student.tau",
                "student.lambda_pair", "student.lambda_list", "student.lambda_emb"]:
        assert space.is_log(key), key
    assert set(space.teacher_keys) == {"prompt.soft_token_rate", "prompt.feat_soft_token_rate",
                                       "prompt.prompt_dropout", "prompt.lr"}
    base = Config()
    pool = S.teacher_pool(space, base, seed=1)
    assert len(pool) == space.options["teacher_pool"] and pool == S.teacher_pool(space, base, seed=1)
    assert pool[0] == {k: S.get_key(base, k) for k in space.teacher_keys}  # variant 0 = the base teacher
    point = S.default_point(space, pool, base)
    assert point is not None and point["teacher_variant"] == 0 and point["student.tau"] == base.student.tau
    assert set(S.param_space(space, pool)) == set(space.student_keys) | {"teacher_variant"}


@pytest.mark.timeout(60)
def test_teacher_signature_depends_on_teacher_stage_keys_only():
    base = Config().to_dict()
    sig = lambda **kv: S.teacher_signature(S.apply_overrides(base, kv), "sha")  # noqa: E731
    same = sig()
    assert sig(**{"student.tau": 4.0, "student.lambda_list": 0.1, "prompt.refresh_epochs": 5,
                  "prompt.round_steps": 3}) == same
    for key, value in [("prompt.soft_token_rate", 0.3), ("prompt.feat_soft_token_rate", 0.3),
                       ("prompt.prompt_dropout", 0.3), ("prompt.lambda_p", 0.1), ("prompt.lr", 0.01),
                       ("teacher.lr", 0.01), ("seed", 7)]:
        assert S.is_teacher_key(key) and sig(**{key: value}) != same, key
    assert not S.is_teacher_key("prompt.refresh_epochs") and not S.is_teacher_key("student.tau")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cpus,workers,k", [(2, 0, None), (2, 1, 4), (8, 2, None), (3, 1, 2), (2, 0, 1)])
def test_resource_plan_never_oversubscribes(cpus, workers, k):
    cfg = Config()
    cfg.dist.num_workers = workers
    plan = plan_resources(cfg, float(cpus), 0.0, num_samples=16, max_concurrent=k)
    need = plan["max_concurrent"] * (TRIAL_CPU + plan["workers"] * plan["cpus_per_worker"])
    assert need <= cpus + 1e-9 and plan["cpus_per_worker"] > 0 and plan["workers"] >= 1
    if k is None:
        assert plan["max_concurrent"] == int(cpus // max(workers, 1))


@pytest.mark.timeout(120)
def test_asha_stop_becomes_a_clean_end_request(ray_session):
    import ray
    from ray.tune.schedulers import TrialScheduler

    from promptmm_dist.tune.hub import NAMESPACE
    from promptmm_dist.tune.trial import GracefulASHA

    @ray.remote(num_cpus=0)
    class FakeHub:
        def __init__(self):
            self.asked = []

        def request_stop(self, trial):
            self.asked.append(trial)

        def get(self):
            return self.asked

    hub = FakeHub.options(name="fake-hub-test", namespace=NAMESPACE).remote()

    class T:
        def __init__(self, tid, config):
            self.trial_id, self.config = tid, config

    sched = GracefulASHA("fake-hub-test", protect=[{"x": 0}], time_attr="training_iteration", max_t=4,
                         grace_period=1, reduction_factor=2, metric="val_recall@20", mode="max")
    trials = [T("a", {"x": 1}), T("b", {"x": 2}), T("c", {"x": 0})]
    for t in trials:
        sched.on_trial_add(None, t)
    res = lambda it, v, **kw: {"training_iteration": it, "val_recall@20": v, **kw}  # noqa: E731
    assert sched.on_trial_result(None, trials[0], res(1, 0.5)) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, trials[1], res(1, 0.1)) == TrialScheduler.CONTINUE  # ASHA: STOP
    assert sched.on_trial_result(None, trials[2], res(1, 0.05)) == TrialScheduler.CONTINUE  # protected
    assert sched.on_trial_result(None, trials[0], res(5, 0.6, final=1)) == TrialScheduler.CONTINUE
    for _ in range(3):  # the stopped trial may report an epoch or so more before it ends
        assert sched.on_trial_result(None, trials[1], res(2, 0.1)) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, trials[1], res(2, 0.1)) == TrialScheduler.STOP  # ignored: hard stop
    assert ray.get(hub.get.remote()) == ["b"] and sched.graceful_stops == 1
    ray.kill(hub)


@pytest.mark.timeout(60)
def test_directory_ends_training_at_the_same_epoch_on_every_rank():
    d = CacheDirectory()
    for e in range(3):
        d.publish(e, 0, {0: ["a"], 1: ["b"]}, ["items"])
    assert d.fetch(0, [0]) is not None
    d.request_end()
    assert d.fetch(0, [1]) is not None  # rank 1 still trains the epoch rank 0 started
    assert d.fetch(1, [0]) is None and d.fetch(1, [1]) is None
    assert d.fetch(2, [1], timeout=0.1) is None


# ---------------------------------------------------------------------------------- sweeps

def _check_outputs(out: Path, n_trials: int) -> tuple[dict, list[dict]]:
    rows = _rows(out)
    assert len(rows) == n_trials
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        assert 0.0 <= metrics["best"][split]["recall@20"] <= 1.0 and "ndcg@20" in metrics["best"][split]
    best_row = max((r for r in rows if r["val_recall@20"]),
                   key=lambda r: (float(r["val_recall@20"]), float(r["val_ndcg@20"])))
    assert metrics["best"]["trial_id"] == best_row["trial_id"]
    assert metrics["best"]["val"]["recall@20"] == pytest.approx(float(best_row["val_recall@20"]), abs=1e-6)
    best_cfg = yaml.safe_load((out / "best_config.yaml").read_text())
    trial_cfg = yaml.safe_load((out / "trials" / best_row["trial_id"] / "config.yaml").read_text())
    assert best_cfg["student"] == trial_cfg["student"] and best_cfg["prompt"] == trial_cfg["prompt"]
    assert "| trial |" in (out / "summary.md").read_text()
    assert (out / "plots" / "val_recall_vs_tau.png").stat().st_size > 1000
    for r in rows:
        assert r["status"] == "TERMINATED" and int(r["epochs_run"]) >= 1 and float(r["wall_s"]) > 0
    return metrics, rows


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_asha_sweep_on_real_subset_shares_one_teacher(ray_session, tiktok_path, tmp_path):
    from promptmm_dist.data.formats import load_dataset
    from promptmm_dist.data.prepare import ensure_canonical
    from promptmm_dist.data.subset import subset_first_users

    folder = ensure_canonical(subset_first_users(load_dataset(tiktok_path), 600), tmp_path / "data")
    space = _write(tmp_path / "space.yaml", {
        "sweep": {"grace_period": 1, "reduction_factor": 2},
        "student.tau": {"loguniform": [0.5, 8.0]}, "student.lambda_list": {"loguniform": [0.01, 2.0]},
        "prompt.refresh_epochs": {"choice": [0, 2]}})
    out = tmp_path / "sweep"
    rc = main(["tune", "--data", str(folder), "--out", str(out), "--num-samples", "4", "--search-space",
               str(space), "--scheduler", "asha", "--num-shards", "2", "--set", "student.epochs=4", *TINY])
    assert rc == 0
    metrics, rows = _check_outputs(out, 4)
    # every trial has the same teacher-stage settings: one teacher, trained once, shared by all
    assert metrics["teachers"]["distinct"] == 1 and metrics["teachers"]["trained"] == 1
    assert metrics["teachers"]["trainings_avoided"] == 3
    assert len({r["teacher"] for r in rows}) == 1 and sum(r["teacher_trained_here"] == "True" for r in rows) == 1
    assert len(json.loads((out / "teachers" / "teachers.json").read_text())) == 1
    # version-0 soft rankings computed once per epoch, served to every trial
    assert metrics["cache"]["epochs_served"] > metrics["cache"]["epochs_computed"] > 0
    assert metrics["sweep"]["scheduler"] == "asha" and metrics["default"]["trial_id"]
    assert all(int(r["epochs_run"]) <= 4 for r in rows)
    assert all(r["stop_reason"] in ("", "asha", "patience") for r in rows)
    default = next(r for r in rows if r["trial_id"] == metrics["default"]["trial_id"])
    assert default["stop_reason"] != "asha"  # the baseline always trains to the end
    # every trial, one the scheduler stopped included, ends with its ranks' evaluation of its best
    # weights (what the report reads: the driver evaluates nothing)
    from promptmm_dist.tune.report import trial_closing
    from promptmm_dist.tune.trial import DONE

    for r in rows:
        closing = trial_closing(json.loads((out / "trials" / r["trial_id"] / DONE).read_text())["checkpoint"])
        assert closing is not None, r["trial_id"]
        assert closing["val"]["recall@20"] == pytest.approx(float(r["val_recall@20"]), abs=1e-6), r["trial_id"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fifo_sweep_with_teacher_pool_then_resume(ray_session, tmp_path):
    from promptmm_dist.data.prepare import ensure_canonical
    from tests.helpers import tiny_data

    folder = ensure_canonical(tiny_data(), tmp_path / "data")
    space = _write(tmp_path / "space.yaml", {
        "sweep": {"teacher_pool": 2, "searcher": "random"},
        "student.tau": {"loguniform": [0.5, 8.0]}, "prompt.soft_token_rate": {"loguniform": [0.01, 1.0]}})
    out = tmp_path / "sweep"
    args = ["tune", "--data", str(folder), "--out", str(out), "--num-samples", "3", "--search-space", str(space),
            "--scheduler", "fifo", "--seed", "2021", "--set", "student.epochs=2", *TINY]
    assert main(args) == 0
    metrics, rows = _check_outputs(out, 3)
    teachers = {r["teacher"] for r in rows}
    # the default point takes variant 0; the seeded random draws pick variants 0 and 1
    assert metrics["teachers"]["distinct"] == len(teachers) == metrics["teachers"]["trained"] == 2
    assert metrics["teachers"]["trials"] == 3
    for r in rows:  # trials of one teacher variant have one soft_token_rate, trials of two differ
        same = [x for x in rows if x["teacher"] == r["teacher"]]
        assert len({x["prompt.soft_token_rate"] for x in same}) == 1
    assert sum(r["teacher_trained_here"] == "True" for r in rows) == len(teachers)
    assert main(args) == 2  # the folder holds a sweep: an explicit --resume is required
    assert main([*args, "--resume"]) == 0  # finished trials are kept; nothing is retrained
    again = json.loads((out / "metrics.json").read_text())
    assert {r["trial_id"] for r in _rows(out)} == {r["trial_id"] for r in rows}
    assert again["teachers"]["trained"] == 0 and again["teachers"]["trained_total"] == 2
    assert again["best"]["trial_id"] == metrics["best"]["trial_id"]
    assert again["cache"]["epochs_served"] == metrics["cache"]["epochs_served"] > 0  # whole-sweep figures
