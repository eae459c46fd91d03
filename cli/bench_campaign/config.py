"""The settings of ``regcl bench campaign`` (:class:`CampaignConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from regcl.data.domains import PAPER_ORDER
from regcl.errors import ConfigError

__all__ = ["GOAL_FORGET", "GOAL_REDUCTION", "GOAL_TASKS", "CampaignConfig"]

GOAL_TASKS = 64
GOAL_REDUCTION = 0.25  # NoC@85 on a domain's held-out tasks at least 25 % below static base
GOAL_FORGET = 0.05  # and on every earlier domain at most 5 % above what it was before


@dataclass(frozen=True)
class CampaignConfig:
    """One campaign run.

    domains: one Label Studio project per domain, labelled in this order. tasks: tasks each
    annotator labels per project (from the domain's train split); heldout: held-out tasks per
    domain (test split) scored by every arm. train_every: START_TRAINING after this many
    annotations (and a held-out evaluation of the current domain: a point of the figure).
    epochs / lr / rank / batch_size / interactive_rounds: the continual step's training.
    stop_iou / min_clicks: an annotator stops clicking once IoU >= stop_iou after at least
    min_clicks clicks (what NoC@85/90 and IoU@1/3/5 need), else at the protocol's cap.
    """

    domains: tuple[str, ...] = PAPER_ORDER
    seeds: tuple[int, ...] = (0, 1, 2)
    tasks: int = 64
    heldout: int = 16
    train_every: int = 32
    epochs: int = 10
    lr: float = 5e-3
    rank: int = 4
    batch_size: int = 8
    interactive_rounds: int = 0
    stop_iou: float = 0.90
    min_clicks: int = 5
    step_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if not self.domains or len(set(self.domains)) != len(self.domains):
            raise ConfigError(f"domains must be distinct and non-empty, got {self.domains}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ConfigError(f"seeds must be distinct and >= 0, got {self.seeds}")
        if self.tasks < 2 or self.heldout < 1 or not 2 <= self.train_every <= self.tasks:
            raise ConfigError("need tasks >= 2, heldout >= 1 and 2 <= train_every <= tasks")
        if self.min_clicks < 5:
            raise ConfigError("min_clicks must be >= 5 (IoU after 5 clicks is reported)")

    @classmethod
    def quick(cls, **overrides: Any) -> CampaignConfig:
        """A smoke run of a few minutes: 2 domains, 16 tasks, 8 held out, 1 seed."""
        return replace(cls(domains=PAPER_ORDER[:2], seeds=(0,), tasks=16, heldout=8,
                           train_every=8, epochs=2), **overrides)

    def step_params(self, domain: str, seed: int) -> dict[str, Any]:
        """The project's extra params (``/labelstudio/setup``): its domain and its steps."""
        return {"domain": domain, "seed": seed,
                "train": {"epochs": self.epochs, "lr": self.lr, "rank": self.rank,
                          "batch_size": self.batch_size,
                          "interactive_rounds": self.interactive_rounds, "seed": seed}}
