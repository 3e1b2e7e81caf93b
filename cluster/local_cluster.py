#!/usr/bin/env python
"""A multi-node Ray cluster on one machine, for tests and for trying `ray job submit` locally.

    python cluster/local_cluster.py start  --workers 2 --state-dir /tmp/pmm-ray    # head + 2 worker nodes
    eval "$(python cluster/local_cluster.py env --state-dir /tmp/pmm-ray)"          # client env (auth, address)
    ray job submit --address "$RAY_API_SERVER_ADDRESS" --working-dir . -- python jobs/pipeline.py ...
    python cluster/local_cluster.py status --state-dir /tmp/pmm-ray [--json]
    python cluster/local_cluster.py stop   --state-dir /tmp/pmm-ray [--clean]

Each node is a separate `ray start` (its own raylet, object store and dashboard agent) with its own CPUs
and a custom resource `node_<k>` (head = node_0), so placement across nodes can be tested on one box.
Every node gets its own temp dir (`--temp-dir TEMP_ROOT/n<k>`, per node since Ray 2.51), hence its own
session dir: its own logs, sockets and runtime_resources. A worker node started without one would use
the head's session dir, and then both nodes' runtime-env agents unpack a job's working dir into the
same `runtime_resources/working_dir_files/_ray_pkg_*` folder: the worker node's agent re-creates it
while the driver runs from it (first submits failed with ModuleNotFoundError or FileNotFoundError at
os.getcwd()).

Stopping never uses `ray stop` (that kills every Ray process of the machine, including other people's
clusters). Every process of this cluster (GCS, raylets, dashboard, agents, workers, job drivers) inherits
the environment variable PROMPTMM_LOCAL_CLUSTER_ID=<random id>; `stop` terminates exactly the processes
carrying this cluster's id (plus the process sessions of the `ray start` calls it made): raylets first,
then the other processes, then the GCS, SIGKILL after a grace period.

Network: the dashboard (Jobs API) and the dashboard agents listen on 127.0.0.1 only. Ray 2.60 rewrites
`--node-ip-address 127.0.0.1` to the machine's routable address and its GCS/raylet gRPC servers listen on
all interfaces, so the cluster is protected with token authentication by default (`--auth token`):
a random token is written to STATE_DIR/auth_token (mode 600) and every node runs with
RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=STATE_DIR/auth_token; clients (`ray job submit`, ray.init)
need the same two variables (`env` prints them). `--auth disabled` sets RAY_AUTH_MODE=disabled
explicitly (otherwise `ray start` silently turns auth on whenever ~/.ray/auth_token exists).

Linux only (reads /proc). Standard library only, so it runs before the package is importable.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ID_VAR = "PROMPTMM_LOCAL_CLUSTER_ID"
STATE_FILE = "state.json"
TOKEN_FILE = "auth_token"
# variables that would make the cluster processes attach to / authenticate against something else
_SCRUB_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
               "RAY_AUTH_MODE", ID_VAR)


def default_state_dir() -> Path:
    return Path(os.environ.get("PROMPTMM_RAY_STATE_DIR") or f"/tmp/promptmm-ray-{os.getuid()}")


def ray_executable() -> str:
    """The `ray` CLI of this interpreter's environment (so the nodes run this Python), else PATH's."""
    local = Path(sys.executable).parent / "ray"
    if local.exists():
        return str(local)
    found = shutil.which("ray")
    if not found:
        raise SystemExit("local_cluster: the `ray` command was not found (pip install 'ray[default]')")
    return found


def node_temp_dir(temp_root: Path, k: int) -> Path:
    """Node k's Ray temp dir (its session dir, logs and unpacked runtime envs live below it)."""
    return temp_root / f"n{k}"


def free_port() -> int:
    # GCS and raylet listen on all interfaces, so test the wildcard address
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- /proc
def _proc_info(pid: int) -> dict | None:
    """sid, state, environ marker, argv of a process; None when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        fields = stat[stat.rindex(")") + 2:].split()
        state, sid = fields[0], int(fields[3])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            env = b""
    except (OSError, ValueError, IndexError):
        return None
    return {"pid": pid, "state": state, "sid": sid, "argv": argv, "environ": env}


def cluster_processes(state: dict) -> list[dict]:
    """Live (non-zombie) processes of this cluster: carrying its id, or in one of its `ray start` sessions."""
    marker = f"{ID_VAR}={state['cluster_id']}".encode()
    sids = set(state.get("sids", []))
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        info = _proc_info(int(entry))
        if info is None or info["state"] in ("Z", "X"):
            continue
        ours = any(part == marker for part in info["environ"].split(b"\0"))
        if ours or info["sid"] in sids:
            found.append(info)
    return found


def _kind(info: dict) -> str:
    exe = os.path.basename(info["argv"][0]) if info["argv"] else ""
    if exe == "raylet":
        return "raylet"
    if exe == "gcs_server":
        return "gcs"
    return "other"


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        time.sleep(0.2)
        pids = {p for p in pids if (_proc_info(p) or {}).get("state", "Z") not in ("Z", "X")}
    return pids


def _signal(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------------------------------ commands
def load_state(state_dir: Path) -> dict:
    path = state_dir / STATE_FILE
    if not path.exists():
        raise SystemExit(f"local_cluster: no cluster state at {path}")
    return json.loads(path.read_text())


def client_env(state: dict) -> dict[str, str]:
    """Environment a client needs: the Jobs API address and the auth settings."""
    env = {"RAY_API_SERVER_ADDRESS": state["dashboard_url"], "RAY_AUTH_MODE": state["auth"]}
    if state["auth"] == "token":
        env["RAY_AUTH_TOKEN_PATH"] = state["token_path"]
    return env


def _http_get(url: str, state: dict, timeout: float = 5.0):
    req = urllib.request.Request(url)
    if state["auth"] == "token":
        req.add_header("Authorization", "Bearer " + Path(state["token_path"]).read_text().strip())
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def alive_nodes(state: dict) -> int:
    """Number of ALIVE nodes as the GCS sees them (dashboard state API)."""
    data = _http_get(state["dashboard_url"] + "/api/v0/nodes?limit=100", state)
    nodes = data.get("data", {}).get("result", {}).get("result", [])
    return sum(1 for n in nodes if n.get("state") == "ALIVE")


def _ray_start(cmd: list[str], env: dict, log: Path, timeout: float) -> tuple[int, int]:
    """Run one `ray start` in a new process session; returns (exit code, session id)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    return rc, proc.pid


def start(args) -> int:
    state_dir = Path(args.state_dir).resolve()
    state_path = state_dir / STATE_FILE
    if state_path.exists():
        old = json.loads(state_path.read_text())
        if cluster_processes(old):
            print(f"local_cluster: a cluster from {state_dir} is still running; stop it first",
                  file=sys.stderr)
            return 1
    state_dir.mkdir(parents=True, exist_ok=True)
    # Unix socket paths must stay under ~107 bytes: keep the Ray temp root short
    temp_root = Path(tempfile.mkdtemp(prefix="pmmray-", dir="/tmp"))
    os.chmod(temp_root, 0o700)
    ray = ray_executable()
    cluster_id = secrets.token_hex(8)
    gcs_port = args.port or free_port()
    dash_port = args.dashboard_port or free_port()
    state = {
        "cluster_id": cluster_id, "state_dir": str(state_dir), "temp_dir": str(temp_root),
        "gcs_address": f"127.0.0.1:{gcs_port}", "dashboard_url": f"http://127.0.0.1:{dash_port}",
        "auth": args.auth, "token_path": None, "sids": [], "nodes": [], "started_at": time.time(),
    }
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB_VARS}
    env.update({ID_VAR: cluster_id, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": args.auth})
    if args.auth == "token":
        token_path = state_dir / TOKEN_FILE
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        state["token_path"] = str(token_path)
        env["RAY_AUTH_TOKEN_PATH"] = str(token_path)

    def save() -> None:
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(state_path)

    common = ["--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--log-style", "record"]
    if args.object_store_mb:
        common += ["--object-store-memory", str(args.object_store_mb * 1024 * 1024)]
    t0 = time.monotonic()
    try:
        for k in range(args.workers + 1):
            head = k == 0
            cmd = [ray, "start", *common,
                   "--num-cpus", str(args.head_cpus if head else args.worker_cpus),
                   "--num-gpus", "0",
                   "--resources", json.dumps({f"node_{k}": 1}),
                   "--dashboard-agent-listen-port", str(free_port()),
                   # each node its own session dir (see the module docstring)
                   "--temp-dir", str(node_temp_dir(temp_root, k))]
            if head:
                cmd += ["--head", "--port", str(gcs_port),
                        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                        "--dashboard-port", str(dash_port), "--ray-client-server-port", str(free_port())]
            else:
                cmd += ["--address", state["gcs_address"]]
            log = state_dir / f"ray-start-node{k}.log"
            rc, sid = _ray_start(cmd, env, log, args.timeout)
            state["sids"].append(sid)
            state["nodes"].append({"node": k, "head": head, "log": str(log),
                                   "temp_dir": str(node_temp_dir(temp_root, k))})
            save()
            if rc != 0:
                print(log.read_text()[-3000:], file=sys.stderr)
                raise RuntimeError(f"`ray start` for node {k} failed (exit {rc}); see {log}")
        deadline = time.monotonic() + args.timeout
        seen = 0
        while True:
            try:
                seen = alive_nodes(state)
            except (urllib.error.URLError, OSError, ValueError):
                seen = 0
            if seen >= args.workers + 1:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {seen} of {args.workers + 1} nodes came up")
            time.sleep(0.5)
    except BaseException as err:
        print(f"local_cluster: start failed: {err}; stopping what was started", file=sys.stderr)
        _stop(state, grace=5.0)
        return 1
    state["start_seconds"] = round(time.monotonic() - t0, 2)
    state["pids"] = sorted(p["pid"] for p in cluster_processes(state))
    save()
    if args.json:
        print(json.dumps({**state, "client_env": client_env(state)}))
    else:
        print(f"Ray cluster up: head + {args.workers} worker node(s) in {state['start_seconds']} s")
        print(f"  GCS address      : {state['gcs_address']}")
        print(f"  dashboard / jobs : {state['dashboard_url']}")
        print(f"  state dir        : {state_dir}")
        print(f"  client env       : eval \"$(python {sys.argv[0]} env --state-dir {state_dir})\"")
        print(f"  submit           : ray job submit --address {state['dashboard_url']} "
              f"--working-dir . -- python jobs/pipeline.py --num-workers {max(args.workers, 1)} ...")
        print(f"  stop             : python {sys.argv[0]} stop --state-dir {state_dir}")
    return 0


def _stop(state: dict, grace: float) -> dict:
    """Terminate this cluster's processes: raylets, then the rest, then the GCS; SIGKILL stragglers."""
    t0 = time.monotonic()
    signalled: set[int] = set()
    killed: set[int] = set()
    for phase in ("raylet", "other", "gcs"):
        procs = [p for p in cluster_processes(state) if _kind(p) == phase]
        pids = {p["pid"] for p in procs}
        _signal(pids, signal.SIGTERM)
        signalled |= pids
        left = _wait_gone(pids, grace / 3)
        _signal(left, signal.SIGKILL)
        killed |= left
    # anything spawned while we were stopping (e.g. a worker a dying raylet was starting)
    for _ in range(5):
        rest = {p["pid"] for p in cluster_processes(state)}
        if not rest:
            break
        _signal(rest, signal.SIGKILL)
        killed |= rest
        signalled |= rest
        _wait_gone(rest, 2.0)
    remaining = sorted(p["pid"] for p in cluster_processes(state))
    return {"stopped": len(signalled), "sigkilled": sorted(killed), "remaining": remaining,
            "stop_seconds": round(time.monotonic() - t0, 2)}


def stop(args) -> int:
    state_dir = Path(args.state_dir).resolve()
    state = load_state(state_dir)
    result = _stop(state, grace=args.grace)
    if args.clean and not result["remaining"]:
        shutil.rmtree(state["temp_dir"], ignore_errors=True)
        shutil.rmtree(state_dir, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"stopped {result['stopped']} process(es) in {result['stop_seconds']} s"
              + (f" ({len(result['sigkilled'])} needed SIGKILL)" if result["sigkilled"] else "")
              + (f"; STILL ALIVE: {result['remaining']}" if result["remaining"] else ""))
    return 1 if result["remaining"] else 0


def status(args) -> int:
    state = load_state(Path(args.state_dir).resolve())
    procs = cluster_processes(state)
    try:
        nodes = alive_nodes(state) if procs else 0
    except (urllib.error.URLError, OSError, ValueError):
        nodes = 0
    out = {"alive_pids": sorted(p["pid"] for p in procs), "alive_nodes": nodes,
           "dashboard_url": state["dashboard_url"], "gcs_address": state["gcs_address"],
           "auth": state["auth"], "client_env": client_env(state)}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{len(procs)} process(es), {nodes} alive node(s); jobs API {state['dashboard_url']}")
    return 0 if procs else 3


def env_cmd(args) -> int:
    state = load_state(Path(args.state_dir).resolve())
    for key, value in client_env(state).items():
        print(f"export {key}={value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="start a head and N worker nodes")
    s.add_argument("--workers", type=int, default=2, help="worker nodes besides the head (default 2)")
    s.add_argument("--head-cpus", type=int, default=1)
    s.add_argument("--worker-cpus", type=int, default=2)
    s.add_argument("--object-store-mb", type=int, default=512, help="per node (0 = Ray's default)")
    s.add_argument("--port", type=int, default=0, help="GCS port (default: a free one)")
    s.add_argument("--dashboard-port", type=int, default=0, help="Jobs API port (default: a free one)")
    s.add_argument("--auth", choices=["token", "disabled"], default="token")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds per `ray start` and for all nodes")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=start)
    t = sub.add_parser("stop", help="terminate exactly this cluster's processes")
    t.add_argument("--grace", type=float, default=9.0, help="seconds before SIGKILL (split in 3 phases)")
    t.add_argument("--clean", action="store_true", help="also remove the state and Ray temp dirs")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=stop)
    st = sub.add_parser("status", help="processes and alive nodes (exit 3 when nothing runs)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=status)
    e = sub.add_parser("env", help="print `export` lines for a client (address + auth)")
    e.set_defaults(func=env_cmd)
    for sp in (s, t, st, e):
        sp.add_argument("--state-dir", default=str(default_state_dir()),
                        help="where the state, token and logs live (default %(default)s)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
