"""What one funnel configuration (one A/B variant) does at each stage."""

from __future__ import annotations

from dataclasses import dataclass

from freshrec.models.click_model import FEATURES
from freshrec.models.config import ModelConfig

CHANNELS = ("cf", "mf", "trending", "cold")


@dataclass(frozen=True)
class FunnelConfig:
    r"""Parameters of recall, coarse rank, fine rank and rerank.

    Parameters
    ----------
    history_window
        How many of the user's most recent items seed item-CF recall.
    cf_recency
        :math:`\tau` in the seeds' recency weight :math:`e^{-a/\tau}`, :math:`a` the seed's
        age in the user's own events (`freshrec.serving.recall`). With ``choice_ranker``,
        where :math:`\tau` starts: it is then learned from users' choices.
    channels
        Recall channels in use: item-CF neighbours of recent items, MF top-K over all items,
        trending (decayed popularity), and the cold pool of new, little-shown items.
    diversity
        MMR lambda: 0 keeps the ranking order, higher trades relevance for variety.
    exploration_slots
        Positions per list reserved for cold items chosen by UCB.
    min_clicks
        Clicks the learned click model needs before it ranks the fine stage; 0 (the default)
        keeps the fixed blend there, so a variant must opt in to serve the learned ranker.
    blend
        ``(feature, weight)`` pairs of this configuration's fixed blend, which ranks the coarse
        stage, and the fine stage unless the click model does; empty means
        `freshrec.models.click_model.FIXED_BLEND`. ``(("cf", 1.0),)`` ranks by the CF score alone.
    mf_read_share
        The share of the catalogue MF recall's cell search may read per request
        (`freshrec.models.inner_product_search.CellIndex`): 1 finds the exact top
        ``recall_mf``; below 1 it stops once that many rows were read, keeping the best of
        the cells whose bounds are highest. Where the cells do not prune (factors without
        cluster structure) the exact search reads every item; at 0.1 it reads a tenth.
    rating_scale
        The lowest and highest valid rating: rating predictions are answered within it, and
        before any rating is learned the mean rating :math:`\mu` is its midpoint.
    choice_ranker
        Without a blend of its own and until the click model serves, rank the fine stage with
        the ranker learned from users' choices among their candidates
        (`freshrec.models.choice_ranker`), which starts at the fixed blend, and seed item-CF
        with the recency scale learned from the same choices; False keeps the fixed blend and
        ``cf_recency``.
    """

    history_window: int = ModelConfig.history_window
    history_cap: int = ModelConfig.history_cap
    cf_recency: float = 5.0
    factors: int = ModelConfig.factors
    channels: tuple[str, ...] = CHANNELS
    recall_per_seed: int = 20
    recall_popular: int = 50
    recall_mf: int = 100
    mf_read_share: float = 1.0
    recall_cold: int = 30
    cold_max_impressions: int = 200
    coarse_keep: int = 150
    diversity: float = 0.15
    exploration_slots: int = 1
    ucb_beta: float = 0.2
    min_clicks: int = 0
    blend: tuple[tuple[str, float], ...] = ()
    choice_ranker: bool = True
    rating_scale: tuple[float, float] = (1.0, 5.0)

    def __post_init__(self) -> None:
        unknown = {name for name, _ in self.blend} - set(FEATURES)
        if unknown:
            raise ValueError(f"blend: unknown features {sorted(unknown)}; known: {FEATURES}")
        if not 0.0 < self.mf_read_share <= 1.0:
            raise ValueError(f"mf_read_share must be in (0, 1], not {self.mf_read_share}")
        low, high = self.rating_scale
        if not low < high:
            raise ValueError(f"rating_scale must be (lowest, highest), not {self.rating_scale}")
