r"""Online implicit-feedback MF with sampled negatives (Hu, Koren & Volinsky, 2008)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from freshrec.models.mf import VectorTable, implicit_part, implicit_steps


def draw_negatives(rng: np.random.Generator, pool_size: int, rows: int, per_row: int) -> np.ndarray:
    """``rows x per_row`` positions into a pool of ``pool_size`` items, in one generator call.

    One call per batch, not one per event: the draws depend only on the generator's state and
    the shape, so a replay of the same batches draws the same negatives. An empty pool still
    draws (positions 0), keeping the generator's sequence independent of the batch's content.

    Examples
    --------
    >>> draw_negatives(np.random.default_rng(0), pool_size=4, rows=2, per_row=3).tolist()
    [[3, 2, 2], [1, 1, 0]]
    """
    return rng.integers(0, max(pool_size, 1), (rows, per_row))


@dataclass(eq=False)
class ImplicitMF:
    r"""Implicit-preference factors learned from interactions and negatives sampled per batch.

    An interaction of strength :math:`f` (its event type's) is preference :math:`p = 1` with
    confidence :math:`c = 1 + \alpha f`; each sampled negative :math:`j` is preference 0 with
    confidence 1. The event and its negatives form one step on
    :math:`\tfrac12 \sum_j c_j (p_j - y_u^\top y_j)^2` (`freshrec.models.mf.implicit_step`):

    .. math::

        e_j = p_j - y_u^\top y_j, \quad
        y_u \leftarrow y_u + \eta \big(\textstyle\sum_j c_j e_j y_j - \lambda y_u\big), \quad
        y_j \leftarrow y_j + \eta (c_j e_j y_u - \lambda y_j)

    with :math:`\eta = \min(\eta_0, 1 / B)` capped so that a step never overshoots (the bound
    :math:`B` and why it holds are in `freshrec.models.mf`). Negatives are drawn uniformly from the
    distinct other items of the same batch: an item of the batch is as likely as any other,
    however many of its events the batch holds. Only the implicit
    part ``y`` of a row moves; the score :math:`y_u^\top y_i` ranks items for a user.

    Parameters
    ----------
    table
        The users' and items' vectors; missing rows start at their initial vectors.
    lr
        :math:`\eta_0`, the step size before the cap.
    reg
        :math:`\lambda`, the L2 penalty on the factors.
    alpha
        :math:`\alpha`, how much an interaction's strength raises its confidence.
    negatives
        How many negatives `learn_many` draws per interaction (repeats and the positive itself
        are dropped, so an event may get fewer).
    seed
        Seed of the generator `learn_many` draws negatives with, or the generator itself.

    Examples
    --------
    >>> from freshrec.models.mf import VectorTable
    >>> mf = ImplicitMF(VectorTable(factors=4, init_std=0.1, seed=0), lr=1.0, reg=0.0, alpha=2.0)
    >>> for _ in range(20):
    ...     mf.learn_one("ann", "dune", strength=1.0, negatives=["heat", "jaws"])
    >>> round(mf.predict_one("ann", "dune"), 2), round(mf.predict_one("ann", "heat"), 2)
    (1.0, 0.0)

    A batch at a time, with negatives drawn from the batch's items:

    >>> mf = ImplicitMF(VectorTable(4, 0.1, 0), lr=1.0, reg=0.0, alpha=2.0, negatives=2, seed=0)
    >>> mf.learn_many(["ann", "bob", "ann"], ["dune", "heat", "jaws"], [1.0, 0.5, 3.0])
    >>> mf.predict_one("ann", "jaws") > mf.predict_one("bob", "jaws")
    True
    """

    table: VectorTable
    lr: float
    reg: float
    alpha: float
    negatives: int = 5
    seed: int | np.random.Generator | None = None

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def predict_one(self, user: str, item: str) -> float:
        r"""The preference score :math:`y_u^\top y_i`."""
        k = self.table.factors
        return float(
            implicit_part(self.table["u:" + user], k) @ implicit_part(self.table["i:" + item], k)
        )

    def learn_one(
        self, user: str, item: str, strength: float = 1.0, negatives: Sequence[str] = ()
    ) -> None:
        """One step on ``item`` (confidence ``1 + alpha strength``) and the distinct
        ``negatives`` other than ``item`` (confidence 1 each)."""
        self.learn_steps([user], [item], [strength], [negatives])

    def learn_steps(
        self,
        users: Sequence[str],
        items: Sequence[str],
        strengths: Sequence[float],
        negatives: Sequence[Sequence[str]],
    ) -> None:
        """`learn_one` for each event in order: the rows the events touch are gathered once,
        stepped by `implicit_steps` and put back."""
        if not users:
            return
        k = self.table.factors
        index: dict[str, int] = {}
        user_rows = np.array([index.setdefault("u:" + u, len(index)) for u in users])
        width = 1 + max(map(len, negatives))
        item_rows = np.full((len(users), width), -1, dtype=np.int64)
        for row, item, others in zip(item_rows, items, negatives, strict=True):
            row[: 1 + len(others)] = [
                index.setdefault("i:" + name, len(index)) for name in (item, *others)
            ]
        vectors = [self.table[name] for name in index]
        parts = np.array([implicit_part(vec, k) for vec in vectors])
        confidences = 1.0 + self.alpha * np.asarray(strengths, dtype=np.float64)
        implicit_steps(parts, user_rows.astype(np.int64), item_rows, confidences, self.lr, self.reg)
        for vec, part in zip(vectors, parts, strict=True):
            implicit_part(vec, k)[:] = part

    def learn_many(
        self, users: Sequence[str], items: Sequence[str], strengths: Sequence[float]
    ) -> None:
        """Learns the interactions in order, each with negatives drawn from ``items``."""
        pool = sorted(set(items))
        picks = draw_negatives(self.rng, len(pool), len(items), self.negatives)
        negatives = [[pool[pick] for pick in row] for row in picks.tolist()]
        self.learn_steps(users, items, strengths, negatives)
