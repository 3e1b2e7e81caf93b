"""Model selection on validation data only: best (optionally smoothed) recall@20, with patience."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class EarlyStopper:
    """Tracks validation recall@20; `smooth_window > 1` selects on a trailing moving average,
    which the small Tiktok validation split (3,051 interactions) needs to be less noisy."""

    patience: int
    smooth_window: int = 1
    metric: str = "recall@20"
    best_score: float = float("-inf")
    best_epoch: int = -1
    history: list[float] = field(default_factory=list)
    _window: deque = field(default_factory=deque)

    def update(self, epoch: int, val_metrics: dict[str, float]) -> bool:
        """Record an epoch; True when this epoch is the new best."""
        value = float(val_metrics[self.metric])
        self.history.append(value)
        self._window.append(value)
        if len(self._window) > self.smooth_window:
            self._window.popleft()
        score = sum(self._window) / len(self._window)
        if score > self.best_score:
            self.best_score, self.best_epoch = score, epoch
            return True
        return False

    def should_stop(self, epoch: int) -> bool:
        return self.patience > 0 and epoch - self.best_epoch >= self.patience

    def state_dict(self) -> dict:
        """Everything `update`/`should_stop` depend on (a resumed run selects the same epoch)."""
        return {"best_score": self.best_score, "best_epoch": self.best_epoch,
                "history": list(self.history), "window": list(self._window)}

    def load_state_dict(self, state: dict) -> None:
        self.best_score, self.best_epoch = float(state["best_score"]), int(state["best_epoch"])
        self.history = [float(x) for x in state["history"]]
        self._window = deque(float(x) for x in state["window"])
