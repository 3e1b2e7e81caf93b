"""User-facing errors: one line, naming the file, the record and the problem."""

from __future__ import annotations


class DataError(Exception):
    """Bad input data. `str(err)` is the single line the CLI prints before exiting with status 2."""

    def __init__(self, path: object, record: str | None, problem: str) -> None:
        self.path = str(path)
        self.record = record
        self.problem = problem
        where = f"{self.path}: {record}" if record else self.path
        super().__init__(f"{where}: {problem}")


class ConfigError(Exception):
    """Bad configuration (unknown key, wrong type). One line, exit status 2."""


class RunFailed(RuntimeError):
    """A run could not go on (an actor lost for good, a wait past `dist.actor_timeout_s`, the KD cache
    failed). `str(err)` is one line naming what failed; the CLI prints it and exits with status 1."""
