"""End to end on a real multi-node Ray cluster, as a new user follows jobs/README.md: cluster/local_cluster.py
starts a fresh head (1 CPU) and two worker nodes (2 CPUs each; separate raylets and session dirs, token
authentication on), and the FIRST `ray job submit` (the real CLI) runs jobs/pipeline.py with 2 Train
workers. It must succeed (the first submit to a fresh cluster used to fail while two nodes unpacked the
working dir into one shared session dir), train on the worker nodes, show each log line once without
tracebacks, and write metrics.json with teacher and student val/test recall@20. The cluster is stopped
in `finally`, and none of its processes may survive.

Deliberately not using the session `ray_session` fixture: this is a separate cluster on its own free ports.
Data: a small Tiktok subset when the real data and the subset helpers exist, else `synthetic`
(override with PROMPTMM_CLUSTER_TEST_DATA=<absolute path>|synthetic).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from promptmm_dist.paths import real_dataset

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster" / "local_cluster.py"
SUBSET_USERS = 300
EXCLUDES = [".venv", ".git", "runs", "out", "**/__pycache__", "*.egg-info", ".pytest_cache"]
HEAD_CPUS = "1"  # the driver and the small shard/teacher actors; the Train workers need the worker nodes
NODE_CPUS = os.environ.get("PROMPTMM_CLUSTER_TEST_CPUS", "2")  # logical CPUs per worker node
TRAIN_WORKERS = 2


def _ray_cli() -> str | None:
    local = Path(sys.executable).parent / "ray"
    return str(local) if local.exists() else shutil.which("ray")


pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(_ray_cli() is None, reason="the `ray` command line is not installed"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="local_cluster.py reads /proc (Linux)"),
]


def _job_data(tmp: Path) -> tuple[str, str]:
    """(--data value, what it is): a small canonical Tiktok subset if possible, else synthetic."""
    override = os.environ.get("PROMPTMM_CLUSTER_TEST_DATA")
    if override:
        return override, "PROMPTMM_CLUSTER_TEST_DATA"
    tiktok = real_dataset("tiktok")
    if not tiktok.exists():
        return "synthetic", f"synthetic (no real data at {tiktok})"
    try:
        from promptmm_dist.data.formats import load_dataset
        from promptmm_dist.data.prepare import ensure_canonical
        from promptmm_dist.data.subset import subset_first_users
    except ImportError as err:
        return "synthetic", f"synthetic (subset helpers not available: {err})"
    out = tmp / f"tiktok{SUBSET_USERS}"
    subset = subset_first_users(load_dataset(str(tiktok)), SUBSET_USERS)
    ensure_canonical(subset, out)
    return str(out), f"Tiktok first {SUBSET_USERS} users ({out})"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _cluster(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLUSTER), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _client_env(state: dict) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_AUTH_", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"))}
    env.update(state["client_env"])
    return env


def _job_info(state: dict, job_id: str) -> dict:
    req = urllib.request.Request(f"{state['dashboard_url']}/api/jobs/{job_id}")
    token = Path(state["token_path"]).read_text().strip()
    req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read().decode())


def _state_api(state: dict, what: str) -> list[dict]:
    """Rows of the dashboard's state API (`nodes`, `actors`), finished jobs' actors included."""
    req = urllib.request.Request(f"{state['dashboard_url']}/api/v0/{what}?limit=10000&detail=true")
    req.add_header("Authorization", "Bearer " + Path(state["token_path"]).read_text().strip())
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read().decode())["data"]["result"]["result"]


def _submit(state: dict, entrypoint: list[str], env_vars: dict, timeout: float) -> tuple[str, str, dict]:
    """`ray job submit` (blocks, streams the logs); returns (submission id, output, final job info)."""
    job_id = f"pmmtest_{uuid.uuid4().hex[:10]}"
    runtime_env = {"excludes": EXCLUDES, "env_vars": env_vars}
    cmd = [_ray_cli(), "job", "submit", "--address", state["dashboard_url"], "--submission-id", job_id,
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env=_client_env(state))
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        subprocess.run([_ray_cli(), "job", "stop", "--address", state["dashboard_url"], job_id],
                       capture_output=True, timeout=60, env=_client_env(state))
        raise AssertionError(f"job {job_id} still running after {timeout} s:\n{err.stdout}") from None
    return job_id, output, _job_info(state, job_id)


def test_first_job_submit_to_a_fresh_local_cluster(tmp_path):
    data, data_note = _job_data(tmp_path)
    print(f"job data: {data_note}")
    # short: Ray puts unix sockets under the state/temp dirs
    state_dir = Path(tempfile.mkdtemp(prefix="pmmtest-", dir="/tmp"))
    state = None
    t0 = time.monotonic()
    started = _cluster("start", "--workers", "2", "--head-cpus", HEAD_CPUS, "--worker-cpus", NODE_CPUS,
                       "--object-store-mb", "300", "--auth", "token", "--state-dir", str(state_dir), "--json")
    try:
        assert started.returncode == 0, f"cluster start failed:\n{started.stdout}\n{started.stderr}"
        state = json.loads(started.stdout.strip().splitlines()[-1])
        print(f"cluster up in {time.monotonic() - t0:.1f} s: {state['dashboard_url']}")

        # the Jobs API is on loopback and refuses unauthenticated requests
        assert state["dashboard_url"].startswith("http://127.0.0.1:")
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(state["dashboard_url"] + "/api/jobs/", timeout=10)
        assert denied.value.code == 401
        # every node has its own temp dir, hence its own session dir
        node_dirs = [Path(n["temp_dir"]) for n in state["nodes"]]
        sessions = [[x for x in d.glob("session_*") if not x.is_symlink()] for d in node_dirs]  # not session_latest
        assert len(set(node_dirs)) == 3 and all(len(x) == 1 and (x[0] / "logs").is_dir() for x in sessions), sessions

        # the FIRST submit: the documented pipeline job, 2 Train workers
        out = tmp_path / "run"
        t1 = time.monotonic()
        job_id, output, info = _submit(
            state,
            ["python", "jobs/pipeline.py", "--data", data, "--out", str(out),
             "--set", "teacher.epochs=2", "--set", "student.epochs=2",
             "--num-workers", str(TRAIN_WORKERS), "--num-shards", "2", "--json"],
            {}, timeout=420,
        )
        print(f"pipeline job {job_id}: {info['status']} in {time.monotonic() - t1:.1f} s")
        assert info["status"] == "SUCCEEDED", f"job {job_id}: {info.get('message')}\n{output[-6000:]}"
        metrics = json.loads((out / "metrics.json").read_text())
        for stage in ("teacher", "student"):
            for split in ("val", "test"):
                value = metrics[stage][split]["recall@20"]
                assert 0.0 <= value <= 1.0, (stage, split, value)

        # the Train workers ran on the worker nodes, which unpacked the working dir in their own session
        nodes = _state_api(state, "nodes")
        head = {n["node_id"] for n in nodes if n["is_head_node"]}
        train_nodes = {a["node_id"] for a in _state_api(state, "actors") if a["class_name"] == "RayTrainWorker"}
        assert train_nodes and not (train_nodes & head), (train_nodes, head)
        # ... one rank per worker node (SPREAD), as each stage's ranks recorded in metrics.json
        placement = metrics["placement"]
        cluster_nodes = {n["node_id"] for n in nodes}
        for stage in ("teacher", "student"):
            ranks = placement[stage]
            assert len(ranks) == TRAIN_WORKERS and len(set(ranks)) == TRAIN_WORKERS, (stage, placement)
            assert not set(ranks) & head and set(ranks) <= cluster_nodes, (stage, placement, head)
        assert len(placement["shards"]) == 2 and set(placement["shards"]) <= cluster_nodes, placement
        assert placement["teacher_workers"] and set(placement["teacher_workers"]) <= cluster_nodes, placement
        for d in node_dirs[1:]:
            assert list(d.glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")), d

        # the log: each line once (one log monitor per session dir), no tracebacks
        for stage in ("teacher", "student"):
            for epoch in range(2):
                lines = [x for x in output.splitlines() if f"{stage} epoch {epoch}/2 " in x]
                assert len(lines) == 1, f"{stage} epoch {epoch}: {len(lines)} lines\n{output[-6000:]}"
        assert "Traceback" not in output and "PlacementGroupCleaner" not in output, output[-6000:]

        # a second, small job: the package comes from the uploaded working dir, and left to the nodes
        # (dist.cpus_per_worker unset) each of the 2 Train workers gets a whole worker node's CPUs
        probe = ("import json, ray, promptmm_dist; from promptmm_dist import ray_setup; "
                 "from promptmm_dist.config import DistConfig; ray.init(); "
                 "aux = 2 * ray_setup.SHARD_CPUS + ray_setup.TEACHER_MODEL_CPUS + ray_setup.TEACHER_WORKER_CPUS; "
                 f"auto = ray_setup.cpus_per_worker(DistConfig(num_workers={TRAIN_WORKERS}, cpus_per_worker=None), aux); "
                 "print('PROBE', json.dumps({'auto': auto, 'pkg': promptmm_dist.__file__}))")
        job_id, output, info = _submit(state, ["python", "-c", probe], {}, timeout=180)
        assert info["status"] == "SUCCEEDED", f"probe job {job_id}: {info}\n{output}"
        probe_out = json.loads(next(x for x in output.splitlines() if x.startswith("PROBE "))[len("PROBE "):])
        assert "working_dir_files" in probe_out["pkg"], probe_out["pkg"]
        assert probe_out["auto"] == float(NODE_CPUS), probe_out
    finally:
        stop_result, survivors = _stop_cluster(state_dir, state)
    assert stop_result.get("remaining") == [], f"cluster stop left processes: {stop_result}"
    assert not survivors, f"processes of the test cluster still alive: {survivors}"

    # the same job as a local run (one node, its own Ray) with the same seed: the same model within 3%
    local_out = tmp_path / "local"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_"))}
    local = subprocess.run([sys.executable, "-m", "promptmm_dist", "run", "--data", data, "--out", str(local_out),
                            "--set", "teacher.epochs=2", "--set", "student.epochs=2",
                            "--num-workers", str(TRAIN_WORKERS), "--num-shards", "2", "--json"],
                           capture_output=True, text=True, timeout=420, cwd=REPO, env=env)
    assert local.returncode == 0, local.stderr[-4000:]
    local_metrics = json.loads((local_out / "metrics.json").read_text())
    for stage in ("teacher", "student"):
        a, b = local_metrics[stage]["test"]["recall@20"], metrics[stage]["test"]["recall@20"]
        print(f"{stage} test recall@20: cluster job {b:.5f}, local run {a:.5f}")
        assert b == pytest.approx(a, rel=0.03), (stage, a, b)


def _stop_cluster(state_dir: Path, state: dict | None) -> tuple[dict, list[int]]:
    """Stop the test cluster (if it got as far as writing its state); clean up when nothing survived."""
    if not (state_dir / "state.json").exists():  # start failed early and already cleaned up after itself
        shutil.rmtree(state_dir, ignore_errors=True)
        return {"remaining": []}, []
    stopped = _cluster("stop", "--state-dir", str(state_dir), "--json", timeout=120)
    print(f"cluster stop: {stopped.stdout.strip()} {stopped.stderr.strip()}")
    try:
        result = json.loads(stopped.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        result = {"error": stopped.stdout + stopped.stderr}
    survivors = [p for p in (state or {}).get("pids", []) if _alive(p)]
    if result.get("remaining") == [] and not survivors:
        temp_dir = (state or {}).get("temp_dir") or json.loads((state_dir / "state.json").read_text())["temp_dir"]
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(state_dir, ignore_errors=True)
    return result, survivors
