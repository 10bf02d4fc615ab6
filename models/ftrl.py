"""FTRL-Proximal logistic regression steps, compiled: the click model's learning
(`freshrec.models.click_model.ClickModel`), as river's ``LogisticRegression`` with
``optim.FTRLProximal`` learns one example after another (McMahan et al., 2013)."""

from __future__ import annotations

import math

import numba
import numpy as np

INTERCEPT_LR = 0.01
"""The intercept's constant SGD step (river's ``LogisticRegression`` default)."""
CLIP_GRADIENT = 1e12
"""river's gradient clip for the log loss."""


@numba.njit(cache=True, nogil=True)
def ftrl_logistic_steps(
    x: np.ndarray,
    present: np.ndarray,
    clicked: np.ndarray,
    z: np.ndarray,
    n: np.ndarray,
    w: np.ndarray,
    intercept: float,
    alpha: float,
    beta: float,
    l1: float,
    l2: float,
) -> float:
    """Examples ``x[e]`` (its features where ``present[e]``), clicked or not, one after another:
    river's ``LogisticRegression.learn_one`` with ``optim.FTRLProximal``, on ``z``, ``n`` and
    the lagging weights ``w`` in place; returns the intercept.

    Per example: the log loss's gradient ``g`` at ``w.x + b`` (its ``+-18`` guards, clipped);
    ``b -= INTERCEPT_LR g``; for each present feature, ``w_i`` from ``z_i`` and ``n_i`` when
    ``|z_i| > l1``, then ``z_i += g_i - sigma_i w_i`` and ``n_i += g_i^2`` with ``g_i = x_i g``
    and ``sigma_i = (sqrt(n_i + g_i^2) - sqrt(n_i)) / alpha``.
    """
    for e in range(x.shape[0]):
        score = 0.0
        for i in range(x.shape[1]):
            if present[e, i]:
                score += w[i] * x[e, i]
        score += intercept
        y = 1.0 if clicked[e] else -1.0
        margin = score * y
        if margin > 18.0:
            g = math.exp(-margin) * -y
        elif margin < -18.0:
            g = -y
        else:
            g = -y / (math.exp(margin) + 1.0)
        g = min(max(g, -CLIP_GRADIENT), CLIP_GRADIENT)
        intercept -= INTERCEPT_LR * g
        for i in range(x.shape[1]):
            if present[e, i] and abs(z[i]) > l1:
                w[i] = -(z[i] - np.sign(z[i]) * l1) / ((beta + math.sqrt(n[i])) / alpha + l2)
        for i in range(x.shape[1]):
            if present[e, i]:
                gi = x[e, i] * g
                sigma = (math.sqrt(n[i] + gi * gi) - math.sqrt(n[i])) / alpha
                z[i] += gi - sigma * w[i]
                n[i] += gi * gi
    return intercept
