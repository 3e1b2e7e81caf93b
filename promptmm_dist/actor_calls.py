"""Bounded waits on Ray actors: every `ray.get`/`ray.wait` of the run goes through here so that no wait
outlasts `dist.actor_timeout_s`, and a timeout or a lost actor ends in one line naming what was
waited for (not a hang, not a page of traceback text)."""

from __future__ import annotations

from typing import Any

from promptmm_dist.errors import RunFailed

DEFAULT_TIMEOUT_S = 300.0  # DistConfig.actor_timeout_s's default, for callers without a config


class ActorTimeout(RunFailed):
    """A wait on an actor or the KD cache hit `dist.actor_timeout_s`."""


class ActorLost(RunFailed):
    """An actor of the run is gone for good (its restarts are used up) or a thread of the run died."""


def one_line(err: BaseException) -> str:
    """`Type: first line` of an error (Ray errors carry whole tracebacks in their text)."""
    cause = getattr(err, "cause", None)  # RayTaskError: the exception raised inside the actor
    if isinstance(cause, BaseException) and cause is not err:
        err = cause
    text = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
    return f"{type(err).__name__}: {text}"[:300] if text else type(err).__name__


def timeout_error(what: str, timeout_s: float) -> ActorTimeout:
    return ActorTimeout(f"timed out after {timeout_s:g}s waiting for {what} (dist.actor_timeout_s)")


def bounded_get(refs: Any, what: str, timeout_s: float) -> Any:
    """`ray.get(refs)` that waits at most `timeout_s`; a lost actor is reported as `ActorLost(what)`."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    try:
        return ray.get(refs, timeout=timeout_s)
    except GetTimeoutError:
        raise timeout_error(what, timeout_s) from None
    except RayActorError as err:
        raise ActorLost(f"{what}: the actor is gone ({one_line(err)})") from None


def bounded_wait(refs: list, what: str, timeout_s: float) -> None:
    """Block until every ref is ready (a value or an error), at most `timeout_s`."""
    import ray

    if not refs:
        return
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    if len(ready) < len(refs):
        raise timeout_error(what, timeout_s)


def current_node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray): what `metrics.json` "placement" records."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - a plain object outside a Ray worker
        return None


class ActorInfo:
    """What every actor of a run answers about itself (tests, benchmarks, `metrics.json` "placement")."""

    def resources(self) -> dict:
        """The CPUs Ray reserved for this actor and the torch threads it uses."""
        import ray
        import torch

        try:
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        except Exception:  # noqa: BLE001 - a plain object outside a Ray worker
            cpus = None
        return {"cpus": cpus, "threads": torch.get_num_threads()}

    def node_id(self) -> str | None:
        """The Ray node this actor runs on."""
        return current_node_id()

    def pid(self) -> int:
        """This actor's process id (fault injection)."""
        import os

        return os.getpid()
