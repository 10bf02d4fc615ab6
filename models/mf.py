r"""Online biased matrix factorisation: the SGD steps, over numpy arrays, no I/O.

A user and an item are each one vector ``[b, p_1 .. p_k, y_1 .. y_k, n]``, the layout they are
stored in: a bias and rating factors ``p`` (or ``q``), implicit-preference factors ``y``, then
the number ``n`` of ratings learned (which sets the bias step; a count, so concurrent workers'
deltas add up like every other element). The two objectives below own separate parameters, so
clicks never bend rating predictions and ratings never dilute the preference model. Ratings
follow Koren, Bell & Volinsky (2009):

.. math::

    \hat r_{ui} = \mu + b_u + b_i + p_u^\top q_i, \qquad e_{ui} = r_{ui} - \hat r_{ui}

    b_u \leftarrow b_u + s_u (e_{ui} - \lambda_b b_u), \quad
    b_i \leftarrow b_i + s_i (e_{ui} - \lambda_b b_i)

    p_u \leftarrow p_u + \gamma (e_{ui} q_i - \lambda p_u), \quad
    q_i \leftarrow q_i + \gamma (e_{ui} p_u - \lambda q_i)

with every gradient taken at the old values and bias steps :math:`s` chosen by the learner
(`freshrec.models.biased_mf.BiasedMF`). With :math:`s = \gamma` and
:math:`\lambda_b = \lambda` this is river's ``reco.BiasedMF`` with ``lr = gamma / 2`` and
``l2 = 2 lambda`` (river differentiates the unhalved squared loss).

Every interaction (click, view, purchase, and a rating too) is implicit feedback in the sense of
Hu, Koren & Volinsky (2008): preference 1 with confidence :math:`c = 1 + \alpha f`, where
:math:`f` is the event type's strength, on the score :math:`s_{ui} = y_u^\top y_i`. The
unobserved side (preference 0, confidence 1) is sampled from the other items of the same
batch, each distinct item as likely as any other whatever its traffic in the batch (a batch's
items are those with traffic now, which favours the popular over the catalogue at large), and
never the event's own item. An event and its sampled negatives :math:`j` form one step (as in
word2vec's negative sampling) on :math:`\tfrac12 \sum_j c_j (p_j - s_{uj})^2`: every error is
taken at the same old :math:`y_u`, each item row moves by its own gradient, and :math:`y_u` by
their sum:

.. math::

    e_j = p_j - y_u^\top y_j, \quad
    y_u \leftarrow y_u + \eta \big(\textstyle\sum_j c_j e_j y_j - \lambda y_u\big), \quad
    y_j \leftarrow y_j + \eta (c_j e_j y_u - \lambda y_j)

with a normalised step size (as in normalised LMS)

.. math::

    \eta = \min\big(\eta_0,\; 1 / B\big), \qquad
    B = \lVert y_u\rVert^2 \max_j c_j + \textstyle\sum_j c_j \lVert y_j\rVert^2 .

Why: to first order (and :math:`\lambda` aside) the step moves the errors to
:math:`e' = (I - \eta M)\, e` with :math:`M = J J^\top C`, where :math:`J` holds the gradients
of the scores (row :math:`j` is :math:`y_j` on :math:`y_u` and :math:`y_u` on :math:`y_j`) and
:math:`C = \mathrm{diag}(c_j)`. :math:`M` is similar to
:math:`C^{1/2} Y Y^\top C^{1/2} + \lVert y_u\rVert^2 C` (:math:`Y` stacks the rows
:math:`y_j`): the user's move plus each item's own. Its eigenvalues are real, at least 0 and at
most :math:`B` (the trace bounds the first term, :math:`\max_j c_j` the second), so with
:math:`\eta B \le 1` every eigen-component of the error shrinks without changing sign, whatever
:math:`\eta_0` (``FRESHREC_IMPLICIT_LR``), the confidences or the norms. A plain step with
:math:`\eta_0 c\, (\lVert y_u\rVert^2 + \lVert y_i\rVert^2) > 2` makes the error grow instead,
and repeated steps diverge. The bilinear remainder is small while errors are small against the
squared norms: for one term the error shrinks, exactly, whenever
:math:`|e| < 2 (\lVert y_u\rVert^2 + \lVert y_i\rVert^2)`. The cap scales the whole gradient, so
the relative confidences stay as Hu, Koren & Volinsky weight them; when :math:`\eta_0 B \le 1`
(small rate, small factors) it is the plain SGD step. Top-N ranking uses :math:`s_{ui}`; rating
prediction uses :math:`\hat r_{ui}`.
"""

from __future__ import annotations

import hashlib

import numba
import numpy as np


def vector_width(factors: int) -> int:
    """Bias, rating factors, implicit factors, rating count."""
    return 2 + 2 * factors


def rating_part(vec: np.ndarray, factors: int) -> np.ndarray:
    """``[b, p]``: a view, so steps on it update ``vec`` in place."""
    return vec[: factors + 1]


def implicit_part(vec: np.ndarray, factors: int) -> np.ndarray:
    """``y``: a view, so steps on it update ``vec`` in place."""
    return vec[factors + 1 : 2 * factors + 1]


def rating_count_at(factors: int) -> int:
    """Where ``n``, the number of ratings learned, sits in a vector: last."""
    return 2 * factors + 1


def initial_vector(entity_id: str, kind: str, factors: int, std: float, seed: int) -> np.ndarray:
    """Bias 0, N(0, std^2) factors (both sets) and count 0, the same in every process for the
    same id.

    Deterministic initialisation lets concurrent workers create a vector without coordination:
    whichever writes first, the others' deltas land on the same starting point.
    """
    digest = hashlib.blake2b(f"{kind}:{entity_id}".encode(), digest_size=8).digest()
    rng = np.random.default_rng([seed, int.from_bytes(digest, "little")])
    vec = np.zeros(vector_width(factors), dtype=np.float64)
    vec[1 : 2 * factors + 1] = rng.normal(0.0, std, 2 * factors)
    return vec


class VectorTable(dict[str, np.ndarray]):
    """Full vectors by row name, ``"u:<user id>"`` or ``"i:<item id>"``; a missing row is created.

    The learners of users and items share one table, each stepping its own part of a row
    (`rating_part`, `implicit_part`). A row read before it exists starts at `initial_vector`,
    the value every process gives it, so a table seeded with some rows (what a store read)
    and one filled on demand hold the same numbers.

    Parameters
    ----------
    factors
        :math:`k`; each row is ``vector_width(factors)`` wide.
    init_std
        Standard deviation of the initial factors.
    seed
        Seed of the initial factors, the same in every process.
    rows
        Rows known already (kept as given, not copied).

    Examples
    --------
    >>> table = VectorTable(factors=2, init_std=0.1, seed=0)
    >>> "u:ann" in table, table["u:ann"].shape, "u:ann" in table
    (False, (6,), True)
    >>> bool(np.array_equal(table["i:dune"], initial_vector("dune", "i", 2, 0.1, 0)))
    True
    """

    def __init__(
        self, factors: int, init_std: float, seed: int, rows: dict[str, np.ndarray] | None = None
    ) -> None:
        super().__init__(rows or {})
        self.factors = factors
        self.init_std = init_std
        self.seed = seed

    def initial(self, name: str) -> np.ndarray:
        """The row ``name`` starts at: `initial_vector` of its kind (``u``/``i``) and id."""
        kind, entity = name.split(":", 1)
        return initial_vector(entity, kind, self.factors, self.init_std, self.seed)

    def __missing__(self, name: str) -> np.ndarray:
        vec = self[name] = self.initial(name)
        return vec


def predict_rating(user: np.ndarray, item: np.ndarray, mean: float) -> float:
    """On ``rating_part`` views: ``mu + b_u + b_i + p_u.q_i``."""
    return float(mean + user[0] + item[0] + user[1:] @ item[1:])


def rating_step(
    user: np.ndarray,
    item: np.ndarray,
    mean: float,
    rating: float,
    lr: float,
    reg: float,
    user_bias_step: float | None = None,
    item_bias_step: float | None = None,
    bias_reg: float | None = None,
) -> float:
    """One SGD step on a rating over ``rating_part`` views, in place; returns ``r - r_hat``.

    The factors step by ``min(lr, 1 / (|p_u|^2 + |q_i|^2))`` with penalty ``reg``: below the
    cap the plain SGD step; at it, the step that moves ``p_u.q_i`` by the error to first
    order (the second-order term, ``eta^2 err^2 p_u.q_i``, can still overshoot one step), as
    ``implicit_step`` caps its step. Without it, ratings on a wide scale (errors of 10 and
    more) made the factors grow to NaN within a thousand ratings; with it, streams of ratings
    between -1000 and 1000 stayed finite over 20,000 ratings. The biases step by
    ``user_bias_step`` and ``item_bias_step`` with penalty ``bias_reg`` (each ``lr`` / ``reg``
    when not given).

    Examples
    --------
    >>> u = np.array([0.0, 0.1, 0.2]); i = np.array([0.0, 0.3, -0.1])
    >>> round(rating_step(u, i, mean=3.0, rating=4.0, lr=0.1, reg=0.0), 6)
    0.99
    >>> u.round(4).tolist(), i.round(4).tolist()
    ([0.099, 0.1297, 0.1901], [0.099, 0.3099, -0.0802])
    """
    err = rating - predict_rating(user, item, mean)
    bias_reg = reg if bias_reg is None else bias_reg
    step_user = lr if user_bias_step is None else user_bias_step
    step_item = lr if item_bias_step is None else item_bias_step
    grad_user = err * item[1:] - reg * user[1:]
    grad_item = err * user[1:] - reg * item[1:]
    bound = float(user[1:] @ user[1:] + item[1:] @ item[1:])
    eta = min(lr, 1.0 / bound) if bound > 0.0 else lr
    user[0] += step_user * (err - bias_reg * user[0])
    item[0] += step_item * (err - bias_reg * item[0])
    user[1:] += eta * grad_user
    item[1:] += eta * grad_item
    return err


def implicit_step(
    user: np.ndarray,
    items: list[np.ndarray],
    preferences: np.ndarray,
    confidences: np.ndarray,
    lr: float,
    reg: float,
) -> np.ndarray:
    """One step on ``1/2 sum_j c_j (p_j - y_u.y_j)^2`` over ``implicit_part`` views, in place.

    ``items`` are distinct rows (the positive and its negatives); each is updated in place.
    The step size is ``min(lr, 1 / (|y_u|^2 max_j c_j + sum_j c_j |y_j|^2))``, which keeps a
    step from overshooting (module docstring); below that bound it is the plain SGD step.
    Returns the errors ``p_j - y_u.y_j`` before the step.

    Examples
    --------
    >>> u = np.array([0.1, 0.2]); pos = np.array([0.3, 0.1]); neg = np.array([0.2, 0.2])
    >>> err = implicit_step(u, [pos, neg], np.array([1.0, 0.0]), np.array([3.0, 1.0]), 0.1, 0.0)
    >>> err.round(3).tolist(), u.round(4).tolist(), pos.round(4).tolist()
    ([0.95, -0.06], [0.1843, 0.2273], [0.3285, 0.157])

    At a rate the plain step would overshoot with, the step is capped:

    >>> u = np.array([1.0, 0.0]); pos = np.array([0.0, 1.0])
    >>> err = implicit_step(u, [pos], np.array([1.0]), np.array([7.0]), 1.0, 0.0)
    >>> u.round(4).tolist(), pos.round(4).tolist(), float(u @ pos)
    ([1.0, 0.5], [0.5, 1.0], 1.0)
    """
    rows = np.stack(items)
    err = preferences - rows @ user
    weighted = confidences * err
    bound = float(confidences @ (rows * rows).sum(axis=1) + confidences.max() * (user @ user))
    eta = min(lr, 1.0 / bound) if bound > 0.0 else lr
    grad_user = weighted @ rows - reg * user
    rows += eta * (np.outer(weighted, user) - reg * rows)
    user += eta * grad_user
    for row, updated in zip(items, rows, strict=True):
        row[:] = updated
    return err


@numba.njit(cache=True, nogil=True)
def implicit_steps(
    rows: np.ndarray,
    users: np.ndarray,
    items: np.ndarray,
    confidences: np.ndarray,
    lr: float,
    reg: float,
) -> None:
    """`implicit_step` for each event in order, over one matrix of implicit parts, in place.

    Event ``e`` steps row ``users[e]`` against the rows ``items[e]``: its item first
    (preference 1, confidence ``confidences[e]``), then its negatives (preference 0,
    confidence 1); an entry of -1, or one that repeats an earlier entry of the event, is
    skipped. The arithmetic is `implicit_step`'s; one compiled pass spares the dozen numpy
    calls each event costs there.
    """
    k = rows.shape[1]
    width = items.shape[1]
    picked = np.empty(width, np.int64)
    err = np.empty(width)
    conf = np.empty(width)
    user = np.empty(k)
    grad = np.empty(k)
    for e in range(users.shape[0]):
        m = 0
        for j in range(width):
            r = items[e, j]
            if r < 0:
                continue
            repeat = False
            for q in range(m):
                repeat = repeat or picked[q] == r
            if not repeat:
                picked[m] = r
                m += 1
        if m == 0:
            continue
        u = users[e]
        user_sq = 0.0
        for d in range(k):
            user[d] = rows[u, d]
            user_sq += user[d] * user[d]
        bound = 0.0
        most = 0.0
        for q in range(m):
            r = picked[q]
            dot = 0.0
            sq = 0.0
            for d in range(k):
                dot += rows[r, d] * user[d]
                sq += rows[r, d] * rows[r, d]
            conf[q] = confidences[e] if q == 0 else 1.0
            err[q] = (1.0 if q == 0 else 0.0) - dot
            bound += conf[q] * sq
            most = max(most, conf[q])
        bound += most * user_sq
        eta = min(lr, 1.0 / bound) if bound > 0.0 else lr
        for d in range(k):
            grad[d] = -reg * user[d]
        for q in range(m):
            r = picked[q]
            weighted = conf[q] * err[q]
            for d in range(k):
                grad[d] += weighted * rows[r, d]
                rows[r, d] += eta * (weighted * user[d] - reg * rows[r, d])
        for d in range(k):
            rows[u, d] = user[d] + eta * grad[d]
