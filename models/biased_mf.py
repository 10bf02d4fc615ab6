r"""Online biased matrix factorisation on explicit ratings (Koren, Bell & Volinsky, 2009)."""

from __future__ import annotations

from dataclasses import dataclass

from freshrec.models.mf import VectorTable, predict_rating, rating_part, rating_step


@dataclass(eq=False)
class BiasedMF:
    r"""Biased MF learned one rating at a time by SGD, around the running mean rating.

    A rating is predicted as :math:`\hat r_{ui} = \mu + b_u + b_i + p_u^\top q_i`, with
    :math:`\mu` the mean of every rating learned so far. Learning :math:`r_{ui}` first folds
    it into :math:`\mu`, then takes one step on :math:`e_{ui} = r_{ui} - \hat r_{ui}` with
    every gradient at the old values (`freshrec.models.mf.rating_step`):

    .. math::

        b_u \leftarrow b_u + \gamma (e_{ui} - \lambda b_u), \quad
        p_u \leftarrow p_u + \gamma (e_{ui} q_i - \lambda p_u)

    and the same for :math:`b_i, q_i`. This is river's ``reco.BiasedMF`` with
    ``lr = gamma / 2`` and ``l2 = 2 lambda``. Only the rating part ``[b, p]`` of a row moves;
    the implicit factors next to it belong to `freshrec.models.implicit_mf.ImplicitMF`.

    Parameters
    ----------
    table
        The users' and items' vectors; missing rows start at their initial vectors.
    lr
        :math:`\gamma`, the step size.
    reg
        :math:`\lambda`, the L2 penalty on biases and factors.
    mean_sum
        Sum of the ratings learned before (for the running mean :math:`\mu`).
    mean_n
        How many ratings were learned before.

    Examples
    --------
    >>> from freshrec.models.mf import VectorTable
    >>> mf = BiasedMF(VectorTable(factors=2, init_std=0.1, seed=0), lr=0.1, reg=0.0)
    >>> for _ in range(100):
    ...     mf.learn_one("ann", "dune", 5.0)
    ...     mf.learn_one("bob", "dune", 3.0)
    ...     mf.learn_one("ann", "heat", 4.0)
    >>> mf.mean
    4.0
    >>> round(mf.predict_one("ann", "dune"), 2), round(mf.predict_one("bob", "dune"), 2)
    (5.0, 3.0)
    """

    table: VectorTable
    lr: float
    reg: float
    mean_sum: float = 0.0
    mean_n: int = 0

    @property
    def mean(self) -> float:
        r""":math:`\mu`, the mean rating learned so far (0 before any)."""
        return self.mean_sum / self.mean_n if self.mean_n else 0.0

    def predict_one(self, user: str, item: str) -> float:
        r""":math:`\hat r_{ui}` at the current parameters."""
        k = self.table.factors
        u_part = rating_part(self.table["u:" + user], k)
        i_part = rating_part(self.table["i:" + item], k)
        return predict_rating(u_part, i_part, self.mean)

    def learn_one(self, user: str, item: str, rating: float) -> None:
        """Fold ``rating`` into the mean, then one SGD step on the user's and item's rows."""
        k = self.table.factors
        u_part = rating_part(self.table["u:" + user], k)
        i_part = rating_part(self.table["i:" + item], k)
        self.mean_sum += rating
        self.mean_n += 1
        rating_step(u_part, i_part, self.mean_sum / self.mean_n, rating, self.lr, self.reg)
