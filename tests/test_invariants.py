"""Invariant kernels against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from ensemble.invariants import (EXPONENTIAL, GAUSSIAN, POWER, WeightSet, check_cutoff, invariants_dataset,
                                 invariants_frame, orthorhombic_box, paper_weights)

W = paper_weights()
KINDS, PARAMS = W.arrays()


def random_system(n=14, box=9.0, seed=0, n_species=2):
    rng = np.random.default_rng(seed)
    while True:   # keep atoms >= 0.8 Å apart so power laws stay tame
        pos = rng.uniform(0, box, size=(n, 3))
        d = pos[:, None] - pos[None]
        d -= box * np.round(d / box)
        r = np.linalg.norm(d, axis=-1) + np.eye(n) * 10
        if r.min() > 0.8:
            break
    species = rng.integers(0, n_species, size=n)
    return pos, np.full(3, box), species.astype(np.int64)


def phi_of(pos, box, species, cutoff=-1.0, width=1.0, n_species=2):
    return invariants_frame(pos, box, species, n_species, KINDS, PARAMS, cutoff, width)


@pytest.mark.parametrize("cutoff", [-1.0, 4.0])
def test_gradient_equals_central_finite_differences(cutoff):
    pos, box, species = random_system(box=9.0 if cutoff < 0 else 13.0)
    phi, grad = phi_of(pos, box, species, cutoff, 1.5)
    h = 1e-5
    for k in (0, 5, 11):
        for c in range(3):
            p, m = pos.copy(), pos.copy()
            p[k, c] += h
            m[k, c] -= h
            fd = (phi_of(p, box, species, cutoff, 1.5)[0][k] - phi_of(m, box, species, cutoff, 1.5)[0][k]) / (2 * h)
            assert_allclose(grad[k, :, :, c], fd, rtol=1e-6, atol=1e-8)


def test_three_atoms_summed_by_hand():
    pos = np.array([[10.0, 10.0, 10.0], [11.0, 10.0, 10.0], [10.0, 12.0, 10.0]])   # O, H, H
    species = np.array([0, 1, 1])
    ws = WeightSet((EXPONENTIAL, GAUSSIAN, POWER, POWER), (1.0, 1.0, 1.0, 2.0))
    k, p = ws.arrays()
    phi, grad = invariants_frame(pos, np.full(3, 50.0), species, 2, k, p, -1.0, 1.0)
    r12, r13, r23 = 1.0, 2.0, np.sqrt(5.0)
    # O sees two H at 1 and 2 Å, no other O
    assert_allclose(phi[0, 1], [np.exp(-1) + np.exp(-2), np.exp(-0.5) + np.exp(-2), 1 + 0.5, 1 + 0.25])
    assert_allclose(phi[0, 0], 0.0)
    # first H: the O at 1 Å and the other H at sqrt(5) Å
    assert_allclose(phi[1, 0], [np.exp(-r12), np.exp(-0.5), 1.0, 1.0])
    assert_allclose(phi[1, 1], [np.exp(-r23), np.exp(-2.5), 1 / r23, 1 / 5])
    # d/dq_O of exp(-r) summed over both H: -e^{-r} (q_O - q_H)/r
    g = -np.exp(-r12) * np.array([-1.0, 0, 0]) - np.exp(-r13) * np.array([0, -1.0, 0])
    assert_allclose(grad[0, 1, 0], g)
    # power n=2 on the first H from the second: d(r^-2)/dq = -2 r^-4 (q_1 - q_2)
    assert_allclose(grad[1, 1, 3], -2 / r23**4 * (pos[1] - pos[2]))


def test_weight_plan_shares_exps_and_matches_each_function_evaluated_alone():
    from numba import njit

    from ensemble.invariants import MAX_SQUARINGS, _weight, weight_plan, weight_values

    @njit
    def all_values(kinds, params, r):
        plan = weight_plan(kinds, params)
        w = np.empty((r.size, kinds.size))
        dw = np.empty((r.size, kinds.size))
        for q in range(r.size):
            weight_values(kinds, plan, r[q], w[q], dw[q])
        return w, dw

    coef, source, squarings, order = weight_plan(KINDS, PARAMS)
    # the paper's 18: exp 1/8 -> 1/4 -> 1/2 -> 1 and 1/6 -> 1/3; Gaussian sigma 8 -> 4 and 2 -> 1 and
    # 6 -> 3 (sigma 4 -> 2 would make 4 squarings from sigma 8); power 1 -> 2
    direct = {W.labels[m] for m in np.flatnonzero(source < 0)}
    assert direct == {"exp(alpha=1/8)", "exp(alpha=1/6)", "exp(alpha=1/5)", "exp(alpha=1/7)", "gauss(sigma=8)",
                      "gauss(sigma=2)", "gauss(sigma=6)", "gauss(sigma=5)", "gauss(sigma=7)", "power(n=1)"}
    assert W.labels[source[0]] == "exp(alpha=1/2)" and squarings[0] == 1
    assert W.labels[source[8]] == "gauss(sigma=2)" and squarings[8] == 2
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    assert (rank[source[source >= 0]] < rank[source >= 0]).all()          # sources first
    for m in range(len(W)):                                               # chains within the cap
        total, j = 0, m
        while source[j] >= 0:
            total, j = total + squarings[j], source[j]
        assert total <= MAX_SQUARINGS
    # against each function on its own (exp per function), over the distances the features see
    r = np.linspace(0.6, 14.0, 2001)
    w, dw = all_values(KINDS, PARAMS, r)
    for m in range(len(W)):
        ref = np.array([_weight(KINDS[m], PARAMS[m], x) for x in r])
        assert_allclose(w[:, m], ref[:, 0], rtol=4e-15, atol=0)
        assert_allclose(dw[:, m], ref[:, 1], rtol=4e-15, atol=0)
    # a set without power-of-two relations evaluates every function directly
    lone = WeightSet((EXPONENTIAL, GAUSSIAN, POWER), (0.3, 1.5, 3.0))
    assert (weight_plan(*lone.arrays())[1] == -1).all()


def test_invariance_under_translation_permutation_and_image_shift():
    pos, box, species = random_system(seed=3)
    phi, grad = phi_of(pos, box, species)
    shifted = (pos + np.array([3.3, -7.1, 12.9])) % box
    assert_allclose(phi_of(shifted, box, species)[0], phi, rtol=1e-12, atol=1e-14)
    images = pos + box * np.random.default_rng(1).integers(-3, 4, size=pos.shape)
    p2, g2 = phi_of(images, box, species)
    assert_allclose(p2, phi, rtol=1e-12, atol=1e-14)
    assert_allclose(g2, grad, rtol=1e-10, atol=1e-13)
    same = np.flatnonzero(species == species[0])
    perm = np.arange(len(pos))
    perm[same] = same[::-1]
    p3, g3 = phi_of(pos[perm], box, species[perm])
    assert_allclose(p3, phi[perm], rtol=1e-12, atol=1e-14)
    assert_allclose(g3, grad[perm], rtol=1e-12, atol=1e-14)


def test_rotation_of_an_isolated_cluster():
    pos, _, species = random_system(seed=4, box=6.0)
    big = np.full(3, 200.0)
    phi, grad = phi_of(pos + 50, big, species)
    a, b, c = 0.3, -1.1, 2.0
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    rot = rz @ ry @ rx
    p2, g2 = phi_of((pos - 3) @ rot.T + 100, big, species)
    assert_allclose(p2, phi, rtol=1e-11)
    assert_allclose(g2, grad @ rot.T, rtol=1e-9, atol=1e-12)


def test_cutoff_mode_equals_paper_mode_when_cutoff_exceeds_every_distance():
    pos, _, species = random_system(n=20, seed=5, box=8.0)
    big = np.full(3, 100.0)
    paper = phi_of(pos, big, species)
    cut = phi_of(pos, big, species, cutoff=30.0, width=5.0)     # inner radius 25 Å > 14 Å max distance
    # identical sums; cell lists visit neighbours in another order (last-bit rounding only)
    assert_allclose(cut[0], paper[0], rtol=1e-14, atol=0)
    assert_allclose(cut[1], paper[1], rtol=1e-13, atol=1e-16)


def test_cell_lists_equal_all_pairs_and_cutoff_is_smooth():
    pos, box, species = random_system(n=60, seed=6, box=14.0)
    cl = phi_of(pos, box, species, cutoff=3.4, width=1.0)           # 4 cells per edge: cell lists
    from ensemble.invariants import _all_pairs
    phi = np.zeros((60, 2, len(W)))
    grad = np.zeros((60, 2, len(W), 3))
    _all_pairs(pos, box, species, KINDS, PARAMS, 3.4, 1.0, phi, grad)
    assert (phi > 0).any(axis=(0, 2)).all()
    assert_allclose(cl[0], phi, rtol=1e-12, atol=1e-15)
    assert_allclose(cl[1], grad, rtol=1e-12, atol=1e-15)
    # a pair crossing r_c changes phi continuously (no jump)
    two = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0 + 4.5 - 1e-7]])
    val = invariants_frame(two, np.full(3, 20.0), np.array([0, 0]), 1, KINDS, PARAMS, 4.5, 1.0)
    assert np.abs(val[0]).max() < 1e-12 and np.abs(val[1]).max() < 1e-6


def test_triclinic_and_oversized_cutoff_are_refused():
    with pytest.raises(ValueError, match="triclinic"):
        orthorhombic_box(np.array([[10, 0, 0], [1, 10, 0], [0, 0, 10.0]]))
    with pytest.raises(ValueError, match="exceeds half the smallest box edge"):
        check_cutoff(8.0, 1.0, np.full(3, 15.0))


def test_dataset_wrapper_is_lazy_and_matches_the_kernel(tmp_path):
    from ensemble.data import load_default

    ds = load_default().isel(frame=slice(0, 6), atom=slice(0, 48)).chunk({"frame": 4})
    inv = invariants_dataset(ds, W.subset(range(4)), cutoff_angstrom=6.0)
    assert inv["phi"].chunks[0] == (4, 2)                       # lazy, chunked like the positions
    assert inv["phi"].dims == ("frame", "atom", "source", "weight")
    k, p = W.subset(range(4)).arrays()
    species = np.array([0 if str(s) == "H" else 1 for s in ds["species"].values])
    ref = invariants_frame(ds["positions"].values[5], np.full(3, 15.6404), species, 2, k, p, 6.0, 1.0)
    assert_allclose(inv["phi"].values[5], ref[0])
    assert_allclose(inv["grad_phi"].values[5], ref[1])
    assert list(inv["source"].values) == ["H", "O"]


@pytest.mark.parametrize("edge,n,cutoff", [(12.0, 150, 4.5), (31.0, 2000, 5.9)])
def test_pairs_within_equal_brute_force_sorted(edge, n, cutoff):
    """All pairs (small box) and cell lists (large box): exactly the minimum-image pairs closer than
    the cutoff, each once (k < i), sorted by k then i; positions outside the box are wrapped."""
    from ensemble.invariants import pairs_within

    rng = np.random.default_rng(7)
    box = np.array([edge, edge * 1.1, edge * 0.95])
    pos = rng.uniform(-1.0, 2.0, size=(n, 3)) * box
    k, i = np.triu_indices(n, 1)
    d = pos[k] - pos[i]
    d -= box * np.rint(d / box)
    near = np.einsum("ij,ij->i", d, d) < cutoff ** 2
    want = np.stack([k[near], i[near]], axis=1)
    got = pairs_within(pos, box, cutoff)
    assert len(want) > 10 * n // 2
    np.testing.assert_array_equal(got, want)
