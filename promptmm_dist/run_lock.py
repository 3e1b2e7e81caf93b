"""One run per output folder: `<out>/.lock` holds the owner's pid (and its start time, so a reused
pid is not mistaken for the owner). A second run into the same --out is refused with one line; the
lock of a process that no longer exists (killed, crashed) is taken over."""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path

from promptmm_dist.errors import ConfigError

LOCK_FILE = ".lock"


def _start_time(pid: int) -> str | None:
    """Process start time in clock ticks since boot (Linux); None where /proc is unavailable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    pid = int(owner.get("pid", 0))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = owner.get("start")
    return started is None or _start_time(pid) in (None, started)


def _me() -> dict:
    return {"pid": os.getpid(), "start": _start_time(os.getpid())}


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def acquire(out: Path) -> Path:
    """Take `<out>/.lock` for this process (re-entrant), released at exit; ConfigError when a live
    process holds it."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    me = _me()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read(path)
            if owner is not None and owner.get("pid") == me["pid"]:
                return path  # this process already holds it (several commands in one process)
            if owner is not None and _alive(owner):
                raise ConfigError(f"{out} is in use by another run (pid {owner['pid']}, lock {path}); "
                                  "wait for it to finish or choose another --out") from None
            # stale (its process is gone) or half-written: take it over
            tmp = out / f".lock.{me['pid']}.tmp"
            tmp.write_text(json.dumps(me))
            os.replace(tmp, path)
            if _read(path) == me:
                break
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(me))
        break
    else:
        raise ConfigError(f"{out}: could not take the run lock {path}")
    atexit.register(release, out)
    return path


def release(out: Path) -> None:
    """Remove the lock if this process holds it."""
    path = out / LOCK_FILE
    owner = _read(path)
    if owner is not None and owner.get("pid") == os.getpid():
        try:
            path.unlink()
        except FileNotFoundError:
            pass
