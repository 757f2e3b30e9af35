"""The split protocols and filters prepare applies (data/prepare/plan.py runs them): their settings, checked.

- leave-one-out: a user's last event is the test target, the one before it the validation target; training
  targets are the events before those with a non-empty history;
- time: global cutoffs at event-time quantiles; a query per user active in the window, with all their
  relevant items in it as targets.
"""

from __future__ import annotations

from dataclasses import dataclass

LEAVE_ONE_OUT = "leave_one_out"
TIME = "time"
MIN_EVENTS_LEAVE_ONE_OUT = 3  # one history event, one validation target, one test target


@dataclass
class SplitConfig:
    protocol: str = LEAVE_ONE_OUT
    max_history: int = 50
    min_user_events: int = 5
    min_item_events: int = 1
    min_positive_rating: float | None = None
    min_relevant_rating: float | None = None
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    keep_cold_users: bool = False
    keep_cold_items: bool = False

    def __post_init__(self) -> None:
        if self.protocol not in (LEAVE_ONE_OUT, TIME):
            raise ValueError(f"split protocol must be '{LEAVE_ONE_OUT}' or '{TIME}', got '{self.protocol}'")
        if self.max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {self.max_history}")
        if not (0 < self.valid_fraction < 1 and 0 < self.test_fraction < 1
                and self.valid_fraction + self.test_fraction < 1):
            raise ValueError("valid_fraction and test_fraction must be in (0, 1) and sum to less than 1")


def filters_in_force(cfg: SplitConfig) -> str:
    """The prepare options that decide which events survive, as the user would type them."""
    parts = [f"--protocol {cfg.protocol}", f"--min-user-events {cfg.min_user_events}",
             f"--min-item-events {cfg.min_item_events}"]
    parts += [f"--min-positive-rating {cfg.min_positive_rating}"] if cfg.min_positive_rating is not None else []
    parts += [f"--min-relevant-rating {cfg.min_relevant_rating}"] if cfg.min_relevant_rating is not None else []
    if cfg.protocol == TIME:
        parts += [f"--valid-fraction {cfg.valid_fraction}", f"--test-fraction {cfg.test_fraction}"]
        parts += ["--keep-cold-users"] * cfg.keep_cold_users + ["--keep-cold-items"] * cfg.keep_cold_items
    return ", ".join(parts)
