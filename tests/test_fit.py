"""The agent-model fit: planted coefficients, dask Gram vs in memory, errors, selection."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from ensemble.data import load_default
from ensemble.fit import (Splits, accumulate_gram, agent_design, backward_elimination, fit_species, frame_splits,
                          n_columns, quadratic_index, relative_rmse)
from ensemble.invariants import EXPONENTIAL, GAUSSIAN, POWER, WeightSet, invariants_frame, species_index
from ensemble.units import EV_PER_ANGSTROM_AMU_TO_ANGSTROM_PER_FS2 as CONV

WS = WeightSet((EXPONENTIAL, GAUSSIAN, POWER), (1.0, 2.0, 1.0))


@pytest.fixture(scope="module")
def small():
    """12 water molecules of the embedded data, 40 frames, chunked in 3 pieces."""
    return load_default().isel(frame=slice(0, 40), atom=slice(0, 36)).compute()


def planted_accelerations(ds, weights, coefs, cutoff=-1.0):
    """a_k = -(c / M) sum_j (A_j + sum_l B_jl phi_l) grad phi_j, with full symmetric B (einsum)."""
    codes, order = species_index(ds["species"].values)
    k, p = weights.arrays()
    out = np.empty(ds["positions"].shape)
    box = np.diag(ds["cell"].values)
    for t in range(ds.sizes["frame"]):
        phi, grad = invariants_frame(ds["positions"].values[t], box, codes, len(order), k, p, cutoff, 1.0)
        phi = phi.reshape(len(codes), -1)
        grad = grad.reshape(len(codes), phi.shape[1], 3)
        for s, (a_vec, b_mat) in enumerate(coefs):
            at = codes == s
            dh = a_vec + phi[at] @ b_mat                        # dH/dphi_j
            out[t, at] = -CONV / ds["masses"].values[at][0] * np.einsum("kj,kjc->kc", dh, grad[at])
    return out


def random_coefs(p, rng):
    a = rng.normal(size=p)
    b = rng.normal(size=(p, p))
    return a, 0.5 * (b + b.T)


def test_frame_splits_follow_the_paper():
    sp = frame_splits(1000, Splits())
    assert (sp[:200] == -1).all() and (sp[200:800] == 0).all()
    assert (sp[800:900] == 1).all() and (sp[900:] == 2).all()


def test_planted_coefficients_are_recovered(small):
    # two weights keep the standardized Gram condition number ~2e6, so normal equations can
    # resolve 1e-8 (three weights reach ~3e9 and ~1e-7: cond x eps)
    ws = WeightSet((EXPONENTIAL, GAUSSIAN), (1.0, 2.0))
    rng = np.random.default_rng(0)
    p = 2 * len(ws)
    coefs = [random_coefs(p, rng) for _ in range(2)]
    ds = small.copy()
    ds["accelerations"] = (("frame", "atom", "xyz"), planted_accelerations(ds, ws, coefs))
    gram = accumulate_gram(ds.chunk({"frame": 15}), ws, splits=Splits(0.0, 0.8, 0.1, 0.1))
    j, l = quadratic_index(p)
    for s in range(2):
        fit = fit_species(gram, s, ridge=0.0)
        a, b = coefs[s]
        truth = np.concatenate([a, b[j, l]])
        assert fit.condition < 1e8
        assert np.abs(fit.coef - truth).max() / np.abs(truth).max() < 1e-8
        assert fit.errors["validation"] < 1e-7


def test_design_predicts_minus_gradient_of_own_loss_by_finite_differences(small):
    rng = np.random.default_rng(1)
    p = 2 * len(WS)
    a, b = random_coefs(p, rng)
    codes, _ = species_index(small["species"].values)
    kinds, params = WS.arrays()
    pos = small["positions"].values[0]
    box = np.diag(small["cell"].values)
    phi, grad = invariants_frame(pos, box, codes, 2, kinds, params, -1.0, 1.0)
    k = 4                                                     # a hydrogen
    x = agent_design(phi[k:k + 1].reshape(1, p), grad[k:k + 1].reshape(1, p, 3), 1.0)
    j, l = quadratic_index(p)
    pred = x @ np.concatenate([a, b[j, l]])

    def loss(q):
        pp = pos.copy()
        pp[k] = q
        f = invariants_frame(pp, box, codes, 2, kinds, params, -1.0, 1.0)[0][k].reshape(p)
        return a @ f + 0.5 * f @ b @ f

    h = 1e-5
    fd = np.array([(loss(pos[k] + h * e) - loss(pos[k] - h * e)) / (2 * h) for e in np.eye(3)])
    assert_allclose(pred, -fd, rtol=1e-6)


def test_dask_gram_equals_in_memory_xtx(small):
    gram = accumulate_gram(small.chunk({"frame": 7}), WS, splits=Splits(0.25, 0.5, 0.25, 0.0))
    codes, _ = species_index(small["species"].values)
    kinds, params = WS.arrays()
    sp = frame_splits(40, Splits(0.25, 0.5, 0.25, 0.0))
    p = 2 * len(WS)
    for s in range(2):
        rows, ys = [], []
        for t in np.flatnonzero(sp == 0):
            phi, grad = invariants_frame(small["positions"].values[t], np.diag(small["cell"].values), codes, 2,
                                         kinds, params, -1.0, 1.0)
            at = codes == s
            scale = CONV / small["masses"].values[at][0]
            rows.append(agent_design(phi[at].reshape(-1, p), grad[at].reshape(-1, p, 3), scale))
            ys.append(small["accelerations"].values[t][at].reshape(-1))
        x, y = np.concatenate(rows), np.concatenate(ys)
        g, b, yy, n = gram.parts(s, 0)
        assert n == x.shape[0] and x.shape[1] == n_columns(p)
        assert_allclose(g, x.T @ x, rtol=1e-10, atol=1e-12 * np.abs(g).max())
        assert_allclose(b, x.T @ y, rtol=1e-10, atol=1e-12 * np.abs(b).max())
        assert_allclose(yy, y @ y, rtol=1e-12)
        # the error from Gram pieces equals the error of predictions on the raw rows
        fit = fit_species(gram, s, ridge=1e-8)
        direct = np.sqrt(np.mean((x @ fit.coef - y) ** 2) / np.mean(y**2))
        assert_allclose(fit.errors["train"], direct, rtol=1e-7)
        assert_allclose(relative_rmse(g, b, yy, fit.coef), direct, rtol=1e-7)
    assert gram.rows[:, 2].tolist() == [0, 0]                  # no test frames with these fractions


def test_gram_on_distributed_workers_equals_the_local_scheduler(small):
    """Without a progress callback too, the chunks' matrices are summed pairwise on the workers (a
    fixed tree, not dask's concatenating reduction): the same Gram set as the local scheduler's sum
    in chunk order, to rounding, and exactly the same rows."""
    from distributed import Client, LocalCluster

    chunked = small.chunk({"frame": 7})                 # 6 chunks: an uneven tree
    local = accumulate_gram(chunked, WS, splits=Splits(0.25, 0.5, 0.25, 0.0))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as cl, \
            Client(cl):
        dist = accumulate_gram(chunked, WS, splits=Splits(0.25, 0.5, 0.25, 0.0))
    assert dist.rows.tolist() == local.rows.tolist() and dist.zz.shape == local.zz.shape
    scale = np.abs(local.zz).max()
    assert scale > 0 and np.abs(local.zz[:, 0]).max() > 0
    assert_allclose(dist.zz, local.zz, rtol=1e-12, atol=1e-13 * scale)


def test_selection_from_submatrices_equals_refitting_from_scratch(small):
    gram = accumulate_gram(small.chunk({"frame": 10}), WS, splits=Splits(0.0, 0.7, 0.3, 0.0))
    curve = backward_elimination(gram, s=1, ridge=1e-9)
    assert [len(k) for k, _, _ in curve] == [3, 2, 1]
    vals = [e for _, e, _ in curve]
    kept, _, fit = curve[1]
    again = accumulate_gram(small.chunk({"frame": 10}), WS.subset(kept), splits=Splits(0.0, 0.7, 0.3, 0.0))
    refit = fit_species(again, 1, ridge=1e-9)
    assert_allclose(refit.errors["validation"], fit.errors["validation"], rtol=1e-8)
    assert_allclose(refit.coef, fit.coef[fit.columns], rtol=1e-6, atol=1e-10 * np.abs(refit.coef).max())
    # the chosen removal is the best of the candidates at that step
    for w in curve[0][0]:
        trial = fit_species(gram, 1, [k for k in curve[0][0] if k != w], ridge=1e-9)
        assert trial.errors["validation"] >= vals[1] - 1e-12
