"""The MF update equals river's reco.BiasedMF, an independent implementation of the same rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from river import optim, reco

from freshrec.models.biased_mf import BiasedMF
from freshrec.models.mf import (
    VectorTable,
    implicit_part,
    implicit_step,
    initial_vector,
    rating_part,
)


def test_with_a_constant_bias_step_biased_mf_equals_river_biased_mf() -> None:
    gamma, lam, k = 0.02, 0.05, 8
    rng = np.random.default_rng(3)
    users = [f"u{n}" for n in range(30)]
    items = [f"i{n}" for n in range(40)]
    river_mf = reco.BiasedMF(
        n_factors=k,
        bias_optimizer=optim.SGD(gamma / 2),
        latent_optimizer=optim.SGD(gamma / 2),
        l2_bias=2 * lam,
        l2_latent=2 * lam,
    )
    ours = BiasedMF(
        VectorTable(k, 0.1, seed=1),
        lr=gamma,
        reg=lam,
        bias_lr=gamma,
        bias_shrinkage=math.inf,
        bias_reg=lam,
    )
    for u in users:  # the same initial factors; biases start at 0 in both
        river_mf.u_latents[u] = rating_part(ours.table["u:" + u], k)[1:].copy()
    for i in items:
        river_mf.i_latents[i] = rating_part(ours.table["i:" + i], k)[1:].copy()

    for _ in range(2000):
        u, i = users[rng.integers(len(users))], items[rng.integers(len(items))]
        r = float(rng.uniform(1, 5))
        # Prequential: each prediction is made before the rating is learned.
        assert ours.predict_one(u, i) == pytest.approx(river_mf.predict_one(u, i), abs=1e-9)
        river_mf.learn_one(u, i, r)
        ours.learn_one(u, i, r)

    assert ours.mean == pytest.approx(river_mf.global_mean.get(), abs=1e-12)
    for u in users[:10]:
        for i in items[:10]:
            assert ours.predict_one(u, i) == pytest.approx(river_mf.predict_one(u, i), abs=1e-9)
        user = rating_part(ours.table["u:" + u], k)
        np.testing.assert_allclose(user[1:], river_mf.u_latents[u], atol=1e-12)
        assert abs(user[0] - river_mf.u_biases[u]) < 1e-12


def _mixed_step_recount(
    ratings: list[tuple[str, str, float]], k: int, beta: float, eta_b: float, eta: float, lam: float
) -> dict[str, list[float]]:
    """The mixed-step rule written out in plain Python, one rating at a time."""
    table = VectorTable(k, 0.1, seed=1)
    start = {
        name: [float(x) for x in table.initial(name)[1 : k + 1]]
        for u, i, _ in ratings
        for name in ("u:" + u, "i:" + i)
    }
    bias = dict.fromkeys(start, 0.0)
    factors = {name: list(vec) for name, vec in start.items()}
    count = dict.fromkeys(start, 0)
    total = 0.0
    for n, (u, i, r) in enumerate(ratings, start=1):
        total += r
        mu = total / n
        un, itn = "u:" + u, "i:" + i
        count[un] += 1
        count[itn] += 1
        pu, qi = factors[un], factors[itn]
        e = r - (mu + bias[un] + bias[itn] + sum(a * b for a, b in zip(pu, qi, strict=True)))
        bias[un] += (1.0 / (count[un] + beta) + eta_b) * e
        bias[itn] += (1.0 / (count[itn] + beta) + eta_b) * e
        factors[un] = [a + eta * (e * b - lam * a) for a, b in zip(pu, qi, strict=True)]
        factors[itn] = [b + eta * (e * a - lam * b) for a, b in zip(pu, qi, strict=True)]
    return {name: [bias[name], *factors[name], count[name]] for name in start}


def test_biased_mf_steps_its_biases_by_one_over_count_plus_shrinkage_plus_a_floor() -> None:
    rng = np.random.default_rng(5)
    ratings = [
        (f"u{rng.integers(20)}", f"i{rng.integers(30)}", float(rng.integers(1, 6)))
        for _ in range(1500)
    ]
    k, beta, eta_b, eta, lam = 4, 10.0, 0.02, 0.1, 0.02
    ours = BiasedMF(
        VectorTable(k, 0.1, seed=1), lr=eta, reg=lam, bias_lr=eta_b, bias_shrinkage=beta
    )
    for u, i, r in ratings:
        ours.learn_one(u, i, r)
    expected = _mixed_step_recount(ratings, k, beta, eta_b, eta, lam)
    for name, (b, *p, n) in expected.items():
        row = ours.table[name]
        assert row[0] == pytest.approx(b, abs=1e-9)
        np.testing.assert_allclose(row[1 : k + 1], p, atol=1e-9)
        assert ours.ratings_learned(name) == n


def test_initial_vectors_are_the_same_in_every_process_and_differ_by_id() -> None:
    a = initial_vector("item-1", "i", 16, 0.1, seed=42)
    assert np.array_equal(a, initial_vector("item-1", "i", 16, 0.1, seed=42))
    assert not np.array_equal(a, initial_vector("item-2", "i", 16, 0.1, seed=42))
    assert not np.array_equal(a, initial_vector("item-1", "u", 16, 0.1, seed=42))
    assert a[0] == 0.0 and 0.05 < a[1:-1].std() < 0.2 and a[-1] == 0.0  # no rating learned


def test_a_row_missing_from_a_vector_table_starts_at_its_initial_vector() -> None:
    table = VectorTable(16, 0.1, seed=42, rows={"i:item-1": np.zeros(34)})
    assert np.array_equal(table["u:user-1"], initial_vector("user-1", "u", 16, 0.1, seed=42))
    assert table["u:user-1"] is table["u:user-1"]  # created once, then held
    assert not table["i:item-1"].any()  # a row given is kept as it is


def test_implicit_positive_raises_and_negative_lowers_the_score() -> None:
    full = {x: initial_vector(x, "x", 8, 0.1, seed=0) for x in ("u", "i", "j")}
    rating_before = {x: rating_part(v, 8).copy() for x, v in full.items()}
    u, i, j = (implicit_part(full[x], 8) for x in ("u", "i", "j"))
    before_i, before_j = u @ i, u @ j
    for _ in range(20):  # i observed with confidence 3, j sampled as unobserved
        implicit_step(u, [i, j], np.array([1.0, 0.0]), np.array([3.0, 1.0]), lr=0.05, reg=0.0)
    assert u @ i > before_i + 0.1
    assert abs(u @ j) < abs(before_j) + 0.05
    for x, v in full.items():  # implicit steps leave biases and rating factors alone
        assert np.array_equal(rating_part(v, 8), rating_before[x])


def _plain_sgd_step(
    u: np.ndarray,
    rows: list[np.ndarray],
    prefs: np.ndarray,
    confs: np.ndarray,
    lr: float,
    reg: float,
) -> np.ndarray:
    """The group step with a fixed rate, written out per row: the reference."""
    err = prefs - np.array([u @ r for r in rows])
    grad_u = sum(c * e * r for c, e, r in zip(confs, err, rows, strict=True)) - reg * u
    for c, e, r in zip(confs, err, rows, strict=True):
        r += lr * (c * e * u - reg * r)
    u += lr * grad_u
    return err


def _bound(u: np.ndarray, rows: list[np.ndarray], confs: np.ndarray) -> float:
    """A bound on the eigenvalues of the linearised step's error map (module docstring)."""
    return float(max(confs) * (u @ u) + sum(c * (r @ r) for c, r in zip(confs, rows, strict=True)))


def test_a_group_step_equals_the_summed_per_row_gradients_below_the_cap() -> None:
    rng = np.random.default_rng(0)
    u, rows = rng.normal(0, 0.2, 6), [rng.normal(0, 0.2, 6) for _ in range(3)]
    prefs, confs, lr, reg = np.array([1.0, 0.0, 0.0]), np.array([4.0, 1.0, 1.0]), 0.03, 0.01
    assert lr * _bound(u, rows, confs) < 1.0  # the cap does not bind
    want_u, want_rows = u.copy(), [r.copy() for r in rows]
    want_err = _plain_sgd_step(want_u, want_rows, prefs, confs, lr, reg)
    err = implicit_step(u, rows, prefs, confs, lr, reg)
    np.testing.assert_allclose(err, want_err)
    np.testing.assert_allclose(u, want_u)
    for got, want in zip(rows, want_rows, strict=True):
        np.testing.assert_allclose(got, want)


def test_above_the_cap_the_step_is_the_same_gradient_scaled_to_one_over_the_bound() -> None:
    rng = np.random.default_rng(1)
    u, rows = rng.normal(size=6), [rng.normal(size=6) for _ in range(4)]
    prefs, confs, reg = np.array([1.0, 0.0, 0.0, 0.0]), np.array([7.0, 1.0, 1.0, 1.0]), 0.02
    eta = 1.0 / _bound(u, rows, confs)
    want_u, want_rows = u.copy(), [r.copy() for r in rows]
    _plain_sgd_step(want_u, want_rows, prefs, confs, eta, reg)
    implicit_step(u, rows, prefs, confs, lr=5.0, reg=reg)
    np.testing.assert_allclose(u, want_u)
    for got, want in zip(rows, want_rows, strict=True):
        np.testing.assert_allclose(got, want)


def test_where_the_plain_step_diverges_the_normalised_step_converges() -> None:
    rng = np.random.default_rng(1)
    start_u, start_rows = rng.normal(0, 0.3, 8), [rng.normal(0, 0.3, 8) for _ in range(3)]
    prefs, confs, lr = np.array([1.0, 0.0, 0.0]), np.array([7.0, 1.0, 1.0]), 0.3
    plain_u, plain_rows = start_u.copy(), [r.copy() for r in start_rows]
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(100):
            _plain_sgd_step(plain_u, plain_rows, prefs, confs, lr, 0.0)
    assert not np.all(np.isfinite(plain_u)) or np.linalg.norm(plain_u) > 1e6

    u, rows = start_u.copy(), [r.copy() for r in start_rows]
    for _ in range(300):
        implicit_step(u, rows, prefs, confs, lr, 0.0)
    np.testing.assert_allclose([u @ r for r in rows], prefs, atol=1e-6)
    assert np.linalg.norm(u) < 2.0


def test_one_normalised_step_shrinks_the_error_without_overshooting() -> None:
    # One term at any rate: e' = e (1 - x) - (x e / S)^2 y_u.y_i with x = eta c S <= 1 and
    # S = |y_u|^2 + |y_i|^2, so |e'| < |e| whenever |e| < 2 S; the plain step needs lr c S < 2.
    rng = np.random.default_rng(2)
    for _ in range(500):
        k = int(rng.integers(2, 33))
        u, item = rng.normal(0, rng.uniform(0.1, 2.0), k), rng.normal(0, rng.uniform(0.1, 2.0), k)
        pref = float(rng.integers(0, 2))
        if abs(pref - u @ item) >= 2 * (u @ u + item @ item):
            continue
        conf, lr = float(rng.choice([1.0, 3.0, 7.0])), float(rng.choice([0.01, 0.1, 1.0, 100.0]))
        (err,) = implicit_step(u, [item], np.array([pref]), np.array([conf]), lr, 0.0)
        assert abs(pref - u @ item) < abs(err) + 1e-12


def test_the_bound_holds_the_eigenvalues_of_the_linearised_error_map() -> None:
    # e' = (I - eta J J^T C) e to first order; J has row j = (y_j on y_u, y_u on y_j's block).
    rng = np.random.default_rng(3)
    for _ in range(200):
        k, m = int(rng.integers(2, 12)), int(rng.integers(1, 8))
        u, rows = rng.normal(size=k), [rng.normal(0, rng.uniform(0.1, 3.0), k) for _ in range(m)]
        confs = rng.choice([1.0, 2.0, 7.0], m)
        jac = np.zeros((m, k * (m + 1)))
        for j, row in enumerate(rows):
            jac[j, :k] = row
            jac[j, k * (j + 1) : k * (j + 2)] = u
        eig = np.linalg.eigvals(jac @ jac.T @ np.diag(confs))
        assert np.all(eig.real > -1e-9) and np.abs(eig.imag).max() < 1e-9
        assert eig.real.max() <= _bound(u, rows, confs) * (1 + 1e-12)
