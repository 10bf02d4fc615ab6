"""Hyperparameters of the online models, independent of where they come from."""

from __future__ import annotations

from dataclasses import dataclass, field

from freshrec.models.decay import rate_from_half_life


@dataclass(frozen=True)
class ModelConfig:
    """What the learners need to know; `freshrec.settings.Settings.model_config` builds it."""

    factors: int = 32
    lr: float = 0.1
    reg: float = 0.02
    bias_lr: float = 0.02
    bias_shrinkage: float = 10.0
    init_std: float = 0.1
    seed: int = 42
    implicit_lr: float = 1.0  # the normalised cap in models.mf.implicit_step decides
    implicit_alpha: float = 2.0
    implicit_negatives: int = 5
    strengths: dict[str, float] = field(
        default_factory=lambda: {"view": 0.5, "click": 1.0, "purchase": 3.0, "rating": 1.0}
    )
    decay_half_life_s: float = 30 * 86400.0
    history_window: int = 30  # the reader's CF seeds (`FunnelConfig`); learning reads the cap
    history_cap: int = 500
    cooccurrence_history: int = 100
    cooccurrence_gap_exponent: float = 0.5
    neighbours_cap: int = 200
    rating_history: int = 200
    rating_pairs_cap: int = 500
    rating_pairs_window: int = 50
    user_ttl_s: int = 90 * 86400
    dedup_events: int = 64  # each user's newest event ids a repeated event_id is checked against
    item_ttl_s: int = 90 * 86400

    @property
    def decay_rate(self) -> float:
        """lambda in w(t) = exp(-lambda (t_now - t)), from the half-life."""
        return rate_from_half_life(self.decay_half_life_s)
