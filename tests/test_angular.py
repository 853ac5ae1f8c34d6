"""Angular invariants against a direct triple loop, a hand-built molecule and finite differences;
invariance under rotation, translation, permutation of like atoms and image shifts."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.polynomial import legendre
from numpy.testing import assert_allclose

from ensemble.angular import AngularBasis, angular_dataset, angular_frame, angular_vjp, default_angular_basis

BASIS = AngularBasis((0.9, 1.6, 2.5), (0.4, 0.5, 0.6), 4.0, 1.0, 4, "diagonal")


def random_cluster(n=16, box=9.0, seed=0):
    rng = np.random.default_rng(seed)
    while True:
        pos = rng.uniform(0, box, size=(n, 3))
        d = pos[:, None] - pos[None]
        d -= box * np.round(d / box)
        if (np.linalg.norm(d, axis=-1) + 10 * np.eye(n)).min() > 0.7:
            break
    return pos, np.full(3, box), rng.integers(0, 2, size=n).astype(np.int64)


def direct(pos, box, species, basis, n_species=2):
    """psi by the definition: the double loop over neighbour pairs i != j of every atom."""
    mu, sg = np.array(basis.mu_angstrom), np.array(basis.sigma_angstrom)
    rc, w, nl = basis.cutoff_angstrom, basis.cutoff_width_angstrom, basis.l_max + 1

    def radial(r):
        x = (r - rc + w) / w
        fc = 1.0 if x <= 0 else (0.0 if x >= 1 else 1 - x * x * (3 - 2 * x))
        return np.exp(-(r - mu) ** 2 / (2 * sg ** 2)) * fc

    nr, n = len(mu), len(pos)
    out = np.zeros((n, basis.n_features(n_species)))
    for k in range(n):
        d = pos[k] - pos
        d -= box * np.round(d / box)
        r = np.linalg.norm(d, axis=1)
        nbs = [i for i in range(n) if i != k and r[i] < rc]
        for i in nbs:
            out[k, species[i] * nr:(species[i] + 1) * nr] += radial(r[i])
        for c, (a, b, nn, mm) in enumerate(basis.channels(n_species)):
            for i in (i for i in nbs if species[i] == a):
                for j in (j for j in nbs if species[j] == b and j != i):
                    cos = d[i] @ d[j] / (r[i] * r[j])
                    for l in range(nl):
                        out[k, n_species * nr + c * nl + l] += (radial(r[i])[nn] * radial(r[j])[mm]
                                                               * legendre.legval(cos, [0] * l + [1]))
    return out


def features(pos, box, species, basis=BASIS):
    return angular_frame(pos, box, species, basis.arrays(2))


@pytest.mark.parametrize("couplings", ["diagonal", "all"])
def test_features_equal_the_direct_triple_loop(couplings):
    basis = AngularBasis(BASIS.mu_angstrom, BASIS.sigma_angstrom, 4.0, 1.0, 4, couplings)
    pos, box, species = random_cluster()
    fr = features(pos, box, species, basis)
    ref = direct(pos, box, species, basis)
    assert fr.x.shape == (16, 2 * 3 + len(basis.channels(2)) * 5)
    assert np.abs(ref).max() > 1.0          # the cluster has neighbours inside the cutoff
    assert_allclose(fr.x, ref, rtol=1e-12, atol=1e-12)


def test_water_molecule_by_hand():
    """O with two H at 0.96 Å and 104.5 degrees: psi[O, HH, l] = 2 R(0.96)^2 P_l(cos 104.5)."""
    th = np.radians(104.5)
    pos = np.array([[5.0, 5.0, 5.0], [5.96, 5.0, 5.0], [5.0 + 0.96 * np.cos(th), 5.0 + 0.96 * np.sin(th), 5.0]])
    species = np.array([1, 0, 0])        # H = 0, O = 1
    basis = AngularBasis((0.96,), (0.3,), 3.0, 1.0, 3, "diagonal")
    x = features(pos, np.full(3, 20.0), species, basis).x
    # features: rho[H], rho[O], then channels (H,H), (H,O), (O,O) x l = 0..3
    assert_allclose(x[0, :2], [2.0, 0.0], atol=1e-15)          # R(0.96) = 1 at its centre, inside fc = 1
    assert_allclose(x[0, 2:6], [2 * legendre.legval(np.cos(th), [0] * l + [1]) for l in range(4)], rtol=1e-12)
    assert_allclose(x[0, 6:], 0.0, atol=1e-15)
    # an H sees the O at 0.96 Å and the other H at d_HH = 2 * 0.96 sin(th / 2), at an angle (180 - th) / 2
    d_hh = 1.92 * np.sin(th / 2)
    r_hh = np.exp(-(d_hh - 0.96) ** 2 / 0.18)
    assert_allclose(x[1, :2], [r_hh, 1.0], rtol=1e-12)
    cos_h = np.cos((np.pi - th) / 2)
    assert_allclose(x[1, 2:6], 0.0, atol=1e-15)                 # one H neighbour: no (H, H) pair
    assert_allclose(x[1, 6:10], [r_hh * legendre.legval(cos_h, [0] * l + [1]) for l in range(4)], rtol=1e-12)
    assert_allclose(x[1, 10:], 0.0, atol=1e-15)


@pytest.mark.parametrize("couplings,l_max", [("diagonal", 3), ("all", 3), ("all", 0), ("all", 4)])
def test_jacobian_and_forces_equal_finite_differences(couplings, l_max):
    basis = AngularBasis(BASIS.mu_angstrom, BASIS.sigma_angstrom, 4.0, 1.0, l_max, couplings)
    pos, box, species = random_cluster(seed=2)
    fr = features(pos, box, species, basis)
    jac = fr.jacobian()
    n = len(pos)
    owner = np.repeat(np.arange(n), np.diff(fr.start))
    dh = np.random.default_rng(5).normal(size=fr.x.shape)
    arr = basis.arrays(2)
    f_cons = angular_vjp(fr.start, fr.nb, fr.geo, species, fr.t, fr.rad, dh, True, *arr.args())
    f_agent = angular_vjp(fr.start, fr.nb, fr.geo, species, fr.t, fr.rad, dh, False, *arr.args())
    h = 1e-6
    for atom in (0, 5, 11):
        for c in range(3):
            p, m = pos.copy(), pos.copy()
            p[atom, c] += h
            m[atom, c] -= h
            fd = (features(p, box, species, basis).x - features(m, box, species, basis).x) / (2 * h)
            an = np.zeros_like(fd)
            np.add.at(an, owner, np.where((owner == atom)[:, None], jac[:, :, c], 0.0))
            np.add.at(an, owner, np.where((fr.nb == atom)[:, None], -jac[:, :, c], 0.0))
            assert_allclose(an, fd, rtol=1e-6, atol=1e-7)
            # vector-Jacobian products: conservative -sum_k dh[k] dx[k]/dq, agent -dh[atom] dx[atom]/dq_atom
            assert f_cons[atom, c] == pytest.approx(-np.sum(dh * fd), rel=1e-6, abs=1e-7)
            assert f_agent[atom, c] == pytest.approx(-dh[atom] @ fd[atom], rel=1e-6, abs=1e-7)
    assert_allclose(f_cons.sum(axis=0), 0.0, atol=1e-11)
    # the self gradient (gradient moments, contracted once per centre) is the sum of the centre's
    # entry Jacobians (computed entry by entry): two independent routes
    own = np.zeros((n,) + jac.shape[1:])
    np.add.at(own, owner, jac)
    assert np.abs(own).max() > 0.1
    assert_allclose(fr.self_gradient(), own, rtol=1e-10, atol=1e-12 * np.abs(own).max())


def test_invariance_under_rotation_translation_permutation_and_images():
    pos, box, species = random_cluster(seed=3)
    fr = features(pos, box, species)
    grad = fr.self_gradient()
    shifted = (pos + np.array([3.3, -7.1, 12.9])) % box
    assert_allclose(features(shifted, box, species).x, fr.x, rtol=1e-11, atol=1e-13)
    images = pos + box * np.random.default_rng(1).integers(-3, 4, size=pos.shape)
    fi = features(images, box, species)
    assert_allclose(fi.x, fr.x, rtol=1e-11, atol=1e-13)
    assert_allclose(fi.self_gradient(), grad, rtol=1e-9, atol=1e-12)
    same = np.flatnonzero(species == species[0])
    perm = np.arange(len(pos))
    perm[same] = same[::-1]
    fp = features(pos[perm], box, species[perm])
    assert_allclose(fp.x, fr.x[perm], rtol=1e-11, atol=1e-13)
    assert_allclose(fp.self_gradient(), grad[perm], rtol=1e-9, atol=1e-12)
    # rotation of an isolated cluster (a box so large that no image is within the cutoff)
    big = np.full(3, 200.0)
    base = features(pos + 50, big, species)
    a, b, c = 0.3, -1.1, 2.0
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    rot = rz @ ry @ rx
    fr2 = features((pos - 3) @ rot.T + 100, big, species)
    assert_allclose(fr2.x, base.x, rtol=1e-10, atol=1e-12)
    assert_allclose(fr2.self_gradient(), base.self_gradient() @ rot.T, rtol=1e-8, atol=1e-11)


def test_cell_lists_equal_all_pairs_and_features_are_smooth_at_the_cutoff():
    rng = np.random.default_rng(4)
    box = np.full(3, 13.0)
    pos = rng.uniform(0, 13.0, size=(60, 3))
    species = rng.integers(0, 2, size=60).astype(np.int64)
    arr = BASIS.arrays(2)
    every = np.array([(k, i) for k in range(60) for i in range(k + 1, 60)], dtype=np.int64)
    assert_allclose(angular_frame(pos, box, species, arr).x, angular_frame(pos, box, species, arr, pairs=every).x,
                    rtol=1e-12, atol=1e-12)
    # a neighbour leaving the cutoff: value and slope vanish there, so the change over +-delta is O(delta^2)
    three = np.array([[1.0, 1.0, 1.0], [5.0, 1.0, 1.0], [1.0, 2.0, 1.0]])
    sp = np.array([0, 1, 0])
    gone = angular_frame(three[[0, 2]], np.full(3, 20.0), sp[[0, 2]], arr).x[0]

    def change(delta):
        three[1, 0] = 5.0 - delta
        return np.abs(angular_frame(three, np.full(3, 20.0), sp, arr).x[0] - gone).max()

    assert change(1e-3) > 0 and change(1e-3) / change(1e-4) == pytest.approx(100, rel=0.01)
    three[1, 0] = 5.0 + 1e-3
    assert_allclose(angular_frame(three, np.full(3, 20.0), sp, arr).x[0], gone, rtol=0, atol=0)


def test_a_longer_csr_list_filtered_equals_its_own_list():
    """csr_within on a list built with a longer cutoff gives, bitwise, the list neighbour_csr builds
    for the angular cutoff from the same candidate pairs (entries, order, geometry, switch), and
    angular_frame from it the same features; the candidates include pairs right at the cutoff."""
    from ensemble.angular import csr_within, neighbour_csr
    from ensemble.invariants import neighbour_pairs

    pos, box, species = random_cluster(40, 10.0, seed=3)
    pos[1] = pos[0] + [BASIS.cutoff_angstrom, 0.0, 0.0]               # exactly at the cutoff: left out
    pos[2] = pos[0] + [0.0, BASIS.cutoff_angstrom - 1e-12, 0.0]       # just inside
    pos %= box
    arr = BASIS.arrays(2)
    pairs = neighbour_pairs(pos, box, 4.9)
    longer = neighbour_csr(pairs, pos, box, 4.9, 1.0, 40)
    want = neighbour_csr(pairs, pos, box, arr.cutoff, arr.width, 40)
    got = csr_within(*longer, arr.cutoff, arr.width)
    assert want[0][-1] < longer[0][-1]
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert np.array_equal(angular_frame(pos, box, species, arr, csr=longer).x,
                          angular_frame(pos, box, species, arr, pairs=pairs).x)


def test_csr_geometry_per_pair_equals_per_entry():
    """neighbour_csr's two ways to the geometry (once per pair, its mirror negated; or entry by entry,
    for many candidates) give bitwise the same list, pairs at and just inside the cutoff and periodic
    images included; and it agrees with a direct minimum-image computation."""
    from ensemble.angular import neighbour_csr
    from ensemble.invariants import neighbour_pairs

    pos, box, species = random_cluster(60, 9.0, seed=5)
    pos[1] = pos[0] + [4.0, 0.0, 0.0]                    # exactly at the cutoff: left out
    pos[2] = pos[0] + [0.0, 4.0 - 1e-12, 0.0]            # just inside
    pos[3] = pos[0] + [0.0, 0.0, 8.5]                    # across the boundary: 0.5 Å through the image
    pos %= box
    pairs = neighbour_pairs(pos, box, 5.0)
    for cutoff in (4.0, -1.0):
        per_pair = neighbour_csr(pairs, pos, box, cutoff, 1.0, 60)
        per_entry = neighbour_csr(pairs, pos, box, cutoff, 1.0, 60, 0)
        for a, b in zip(per_pair, per_entry):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    start, nb, geo = neighbour_csr(pairs, pos, box, 4.0, 1.0, 60)
    k = np.repeat(np.arange(60), np.diff(start))
    d = pos[k] - pos[nb]
    d -= box * np.round(d / box)
    assert_allclose(geo[:, :3], d, rtol=0, atol=1e-12)
    assert_allclose(geo[:, 3], np.linalg.norm(d, axis=1), rtol=1e-15)
    assert np.all(geo[:, 3] < 4.0) and 1 not in nb[start[0]:start[1]] and 2 in nb[start[0]:start[1]]
    assert 3 in nb[start[0]:start[1]] and geo[start[0] + list(nb[start[0]:start[1]]).index(3), 2] == pytest.approx(0.5)
    x = (geo[:, 3] - 3.0) / 1.0                          # the switch over the last Å
    fc = np.where(x > 0, 1 - x * x * (3 - 2 * x), 1.0)
    assert_allclose(geo[:, 4], fc, rtol=0, atol=1e-14)


def test_dataset_wrapper_is_lazy_and_matches_the_kernel():
    import dask
    import xarray as xr

    from ensemble.data import load_default

    ds = load_default().isel(frame=slice(0, 4))
    ds = ds.assign(positions=ds["positions"].chunk({"frame": 2}))   # only the positions are dask-backed
    basis = default_angular_basis(4.5)

    def refuse(*args, **kwargs):
        raise AssertionError("computed while building the graph")

    with dask.config.set(scheduler=refuse):
        out = angular_dataset(ds, basis)
    assert isinstance(out["psi"].data, dask.array.Array) and out.sizes["angular_feature"] == basis.n_features(2)
    got = out["psi"].isel(frame=3).values
    codes = np.array([0 if s == "H" else 1 for s in ds["species"].values])
    want = angular_frame(ds["positions"].values[3], np.diag(ds["cell"].values), codes, basis.arrays(2)).x
    assert_allclose(got, want, rtol=1e-13)
    assert isinstance(out, xr.Dataset) and str(out["angular_feature"].values[0]) == "rho[H, R0]"


def test_bad_bases_are_refused():
    with pytest.raises(ValueError, match="as many centres as widths"):
        AngularBasis((1.0, 2.0), (0.3,), 4.0)
    with pytest.raises(ValueError, match="cutoff_width"):
        AngularBasis((1.0,), (0.3,), 4.0, 5.0)
    with pytest.raises(ValueError, match="couplings"):
        AngularBasis((1.0,), (0.3,), 4.0, 1.0, 2, "some")
    with pytest.raises(ValueError, match="l_max"):
        AngularBasis((1.0,), (0.3,), 4.0, 1.0, 12)


def test_derivative_kernels_with_an_isolated_atom_and_a_lone_pair():
    """Atoms with no neighbour (an isolated O), with one neighbour (a lone H2 pair: no angle) and a
    molecule: the fused kernels (gradient-moment self gradient, factored design sums) against the
    entry Jacobians, and zero rows where nothing moves a feature."""
    from ensemble.features import FeatureSpec, frame_terms
    from ensemble.fit.design import conservative_feature_rows, conservative_rows_blas
    from ensemble.invariants import WeightSet

    pos = np.array([[5.0, 5.0, 5.0], [5.96, 5.0, 5.0], [4.76, 5.93, 5.0],       # H2O: O, H, H
                    [5.3, 8.1, 7.4], [5.3, 8.85, 7.4],                          # an H2 pair
                    [16.0, 16.0, 16.0]])                                         # a lone O
    species = np.array([1, 0, 0, 0, 0, 1], np.int64)
    box = np.full(3, 22.0)
    basis = AngularBasis((0.9, 1.6), (0.4, 0.5), 4.0, 1.0, 3, "all")
    fr = features(pos, box, species, basis)
    assert fr.start[6] == fr.start[5]                      # the lone O has no entry
    jac = fr.jacobian()
    owner = np.repeat(np.arange(6), np.diff(fr.start))
    own = np.zeros((6,) + jac.shape[1:])
    np.add.at(own, owner, jac)
    grad = fr.self_gradient()
    assert np.abs(grad[0]).max() > 0.01 and not grad[5].any()
    assert_allclose(grad, own, rtol=1e-10, atol=1e-13)
    spec = FeatureSpec(2, WeightSet((0,), (1.0,)), basis, "pair", 4.0, 1.0)
    terms = frame_terms(pos, box, species, spec)
    a = conservative_feature_rows(terms, species, spec, np.zeros((18, 2 * spec.block)))
    b = conservative_rows_blas(terms, species, spec, np.full((18, 2 * spec.block), np.nan))
    assert_allclose(b, a, rtol=0, atol=1e-12 * np.abs(a).max())
    assert not b[15:].any()                                # nothing moves the lone O's features or its rows
