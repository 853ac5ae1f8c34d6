"""Many-body models (pair + angular invariants, short-range prior): forces against finite
differences of the energy, MD force functions against direct forces, the design rows against
the forces they predict, JSON round trip; the prior's shape."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose

from ensemble.angular import AngularBasis
from ensemble.data import load_default
from ensemble.features import FeatureSpec, frame_terms
from ensemble.fit.design import agent_feature_rows, conservative_feature_rows
from ensemble.invariants import EXPONENTIAL, GAUSSIAN, POWER, WeightSet, species_index
from ensemble.model import Model, load_model
from ensemble.prior import ShortRangePrior, shortest_distances
from ensemble.units import EV_PER_ANGSTROM_AMU_TO_ANGSTROM_PER_FS2 as CONV

WS = WeightSet((EXPONENTIAL, GAUSSIAN, POWER), (1.0, 2.0, 2.0))
ANG = AngularBasis((0.95, 1.6, 2.6), (0.3, 0.35, 0.45), 4.0, 1.0, 3, "all")


def random_manybody(kind, cutoff=5.0, seed=0, scale=0.02, prior=None, quad_features=None):
    """Random coefficients over pair + angular features; B nonzero on the first ``quad_features``."""
    rng = np.random.default_rng(seed)
    f = 2 * len(WS) + ANG.n_features(2)
    nq = quad_features or 2 * len(WS) + 2 * ANG.n_radial
    a, b = [], []
    for _ in range(2):
        a.append(rng.normal(size=f) * scale)
        m = np.zeros((f, f))
        m[:nq, :nq] = rng.normal(size=(nq, nq)) * scale * 0.1
        b.append(0.5 * (m + m.T))
    return Model(kind=kind, species=("H", "O"), masses=(1.00794, 15.9994), weights=WS, A=tuple(a), B=tuple(b),
                 cutoff_angstrom=cutoff, width_angstrom=1.0, angular=ANG, prior=prior)


@pytest.fixture(scope="module")
def water():
    """The first frame of the embedded 128 H2O and a 36-atom piece of it."""
    ds = load_default().isel(frame=slice(0, 2)).compute()
    return ds


@pytest.mark.parametrize("quadratic", ["pair+radial", "pair"])
def test_conservative_manybody_forces_are_minus_energy_gradient(water, quadratic):
    """Quadratic terms on the radial angular features (two-pass MD forces: features, then their
    vector-Jacobian product) or on pair features only (the fused one-pass kernel)."""
    pos = water["positions"].values[0]
    box = np.diag(water["cell"].values)
    sp = water["species"].values
    codes, _ = species_index(sp, ["H", "O"])
    short = shortest_distances(pos[None], box[None], codes, 2)
    # a prior whose onset lies above some pairs of this frame, so that its forces are exercised too
    prior = ShortRangePrior(("H", "O"), short + 0.15, margin_angstrom=0.05)
    model = random_manybody("conservative", prior=prior, quad_features=2 * len(WS) if quadratic == "pair" else None)
    f = model.forces(pos, box, sp)
    e0 = model.energy(pos, box, sp)
    h = 1e-5
    fd_noise = 50 * np.finfo(float).eps * abs(e0) / h
    for k in (0, 1, 100, 383):
        for c in range(3):
            p, m = pos.copy(), pos.copy()
            p[k, c] += h
            m[k, c] -= h
            fd = -(model.energy(p, box, sp) - model.energy(m, box, sp)) / (2 * h)
            assert_allclose(f[k, c], fd, rtol=1e-6, atol=max(1e-8, fd_noise))
    assert_allclose(f.sum(axis=0), 0.0, atol=1e-10 * np.abs(f).max())
    assert prior.energy_forces(pos, box, codes)[0] > 0          # the prior did act in this check
    # the MD force function (Verlet list, one pass) gives the same forces and energy
    fn = model.force_fn(box, sp)
    assert fn.fused_angular == (quadratic == "pair")
    f2, e2 = fn(pos)
    assert_allclose(f2, f, rtol=1e-10, atol=1e-11)
    assert e2 == pytest.approx(e0, rel=1e-12)


@pytest.mark.parametrize("cutoff,quadratic", [(None, "pair+radial"), (5.0, "pair+radial"), (5.0, "pair")])
def test_agent_manybody_forces_are_minus_own_loss_gradient(water, cutoff, quadratic):
    ds = water.isel(atom=slice(0, 48))
    pos = ds["positions"].values[1]
    box = np.diag(ds["cell"].values)
    sp = ds["species"].values
    model = random_manybody("agent", cutoff=cutoff, quad_features=2 * len(WS) if quadratic == "pair" else None)
    f = model.forces(pos, box, sp)
    codes, _ = species_index(sp, ["H", "O"])

    def own_loss(p, k):
        x = model.features(p, box, sp)[k]
        s = codes[k]
        return float(model.A[s] @ x + 0.5 * x @ model.B[s] @ x)

    h = 1e-5
    for k in (0, 2, 30):
        for c in range(3):
            p, m = pos.copy(), pos.copy()
            p[k, c] += h
            m[k, c] -= h
            assert f[k, c] == pytest.approx(-(own_loss(p, k) - own_loss(m, k)) / (2 * h), rel=1e-6, abs=1e-8)
    fn = model.force_fn(box, sp)
    assert fn.fused_angular == (quadratic == "pair")
    f2, _ = fn(pos)
    assert_allclose(f2, f, rtol=1e-10, atol=1e-11)


def test_design_rows_predict_the_model_forces(water):
    """Design rows x coefficients = model forces (conservative) / accelerations (agent)."""
    ds = water.isel(atom=slice(0, 60))
    pos = ds["positions"].values[0]
    box = np.diag(ds["cell"].values)
    sp = ds["species"].values
    codes, _ = species_index(sp, ["H", "O"])
    nq = 2 * len(WS) + 2 * ANG.n_radial
    spec = FeatureSpec(2, WS, ANG, "pair+radial", 5.0, 1.0)
    model = random_manybody("conservative", quad_features=nq)
    j, l = spec.quadratic_pairs()
    coef = np.concatenate([np.concatenate([model.A[s], model.B[s][j, l]]) for s in range(2)])
    terms = frame_terms(pos, box, codes, spec)
    x = conservative_feature_rows(terms, codes, spec)
    assert x.shape == (180, 2 * spec.block)
    assert_allclose(x @ coef, model.forces(pos, box, sp).ravel(), rtol=1e-9, atol=1e-10)
    agent = random_manybody("agent", quad_features=nq)
    grad = terms.self_gradient(codes, 2)
    for s in range(2):
        at = np.flatnonzero(codes == s)
        z = np.empty((3 * at.size, spec.block + 1))
        agent_feature_rows(np.ascontiguousarray(terms.x[at]), np.ascontiguousarray(grad[at]), j, l,
                           np.zeros((at.size, 3)), 1.0, z)
        want = agent.forces(pos, box, sp)[at].ravel()
        assert_allclose(z[:, :-1] @ np.concatenate([agent.A[s], agent.B[s][j, l]]), want, rtol=1e-9, atol=1e-10)


def test_paper_mode_pairs_with_angular_force_function(water):
    ds = water.isel(atom=slice(0, 48))
    pos = ds["positions"].values[0]
    box = np.diag(ds["cell"].values)
    sp = ds["species"].values
    model = random_manybody("conservative", cutoff=None)
    fn = model.force_fn(box, sp)
    rng = np.random.default_rng(3)
    for _ in range(3):          # atoms move: the angular Verlet list is reused, then rebuilt
        pos = pos + rng.normal(scale=0.05, size=pos.shape)
        f, e = fn(pos)
        assert_allclose(f, model.forces(pos, box, sp), rtol=1e-10, atol=1e-11)
        assert e == pytest.approx(model.energy(pos, box, sp), rel=1e-12)


def test_manybody_json_round_trip(tmp_path, water):
    pos = water["positions"].values[0]
    box = np.diag(water["cell"].values)
    sp = water["species"].values
    prior = ShortRangePrior(("H", "O"), np.array([[1.4, 0.9], [0.9, np.inf]]))
    model = random_manybody("conservative", prior=prior)
    path = model.save(tmp_path / "m.json")
    d = json.loads(path.read_text())
    assert d["format"] == "ensemble.model/2" and d["angular_basis"]["couplings"] == "all"
    assert d["prior"]["shortest_training_distance_angstrom"] == {"H-H": 1.4, "H-O": 0.9, "O-O": None}
    assert len(d["feature_labels"]) == 2 * len(WS) + ANG.n_features(2)
    again = load_model(path)
    assert again.angular == ANG and again.prior.onset_angstrom[0, 1] == pytest.approx(0.85)
    assert_allclose(again.forces(pos, box, sp), model.forces(pos, box, sp), rtol=0, atol=0)


def test_prior_is_zero_above_its_onset_repulsive_below_and_smooth():
    prior = ShortRangePrior(("H", "O"), np.array([[1.5, 0.9], [0.9, 2.4]]), margin_angstrom=0.05)
    codes = np.array([1, 0])
    box = np.full(3, 30.0)

    def at(r):
        e, f = prior.energy_forces(np.array([[1.0, 1.0, 1.0], [1.0 + r, 1.0, 1.0]]), box, codes)
        return e, f[1, 0]                 # force on the H along +x (away from the O)

    r0 = 0.85
    for r in (0.86, 0.9, 1.0, 3.0):
        assert at(r) == (0.0, 0.0)
    for r in (0.84, 0.8, 0.7, 0.6):
        e, f = at(r)
        assert e > 0 and f > 0             # repulsive: pushes the H away from the O
    # monotone: closer is stronger
    assert at(0.6)[1] > at(0.7)[1] > at(0.8)[1] > 0
    # forces are -dV/dr (central differences) and V, V', V'' vanish at the onset (C^2)
    h = 1e-6
    for r in (0.6, 0.75, 0.84):
        assert at(r)[1] == pytest.approx(-(at(r + h)[0] - at(r - h)[0]) / (2 * h), rel=1e-6)
    d = 1e-3
    assert at(r0 - d)[0] == pytest.approx(0.1 * d ** 3 / (6 * 0.05 ** 3), rel=1e-2)      # V ~ delta^3
    assert at(r0 - d)[1] == pytest.approx(0.1 * d ** 2 / (2 * 0.05 ** 3), rel=1e-2)      # V' ~ delta^2
    # pairs never seen within reach get no prior
    none = ShortRangePrior(("H", "O"), np.array([[np.inf, 0.9], [0.9, np.inf]]))
    assert none.onset_angstrom[0, 0] == 0 and none.onset_angstrom[1, 1] == 0
    e, f = none.energy_forces(np.array([[1.0, 1.0, 1.0], [1.2, 1.0, 1.0]]), box, np.array([1, 1]))
    assert e == 0 and not f.any()


def test_shortest_distances_by_hand():
    pos = np.array([[[0.0, 0.0, 0.0], [0.97, 0.0, 0.0], [0.0, 1.01, 0.0], [9.5, 0.0, 0.0]]])
    codes = np.array([1, 0, 0, 1])
    d = shortest_distances(pos, np.full((1, 3), 10.0), codes, 2)
    assert_allclose(d, [[np.hypot(0.97, 1.01), 0.97], [0.97, 0.5]])      # O-O through the periodic image


# --------------------------------------------------------------------------- fitting many-body models
PLANT_WS = WeightSet((EXPONENTIAL, GAUSSIAN), (1.0, 2.0))
PLANT_ANG = AngularBasis((1.0, 2.2), (0.4, 0.6), 4.0, 1.0, 2, "all")


def planted(kind, seed=0):
    """A many-body model whose coefficients a fit can identify: quadratic in the pair invariants,
    linear in the angular ones, and (conservative) each two-body potential in one species block."""
    from ensemble.features import FeatureSpec

    spec = FeatureSpec(2, PLANT_WS, PLANT_ANG, "pair", 4.9, 1.0)
    rng = np.random.default_rng(seed)
    f, p = spec.n_features, spec.p
    src = spec.two_body_source()
    a, b = [], []
    for s in range(2):
        av = rng.normal(size=f) * 0.1
        if kind == "conservative":
            av[(src >= 0) & (src < s)] = 0.0
        m = np.zeros((f, f))
        m[:p, :p] = rng.normal(size=(p, p)) * 0.01
        a.append(av)
        b.append(0.5 * (m + m.T))
    model = Model(kind=kind, species=("H", "O"), masses=(1.00794, 15.9994), weights=PLANT_WS, A=tuple(a),
                  B=tuple(b), cutoff_angstrom=4.9, width_angstrom=1.0, angular=PLANT_ANG)
    return spec, model


@pytest.mark.parametrize("kind", ["conservative", "agent"])
def test_planted_manybody_coefficients_are_recovered(kind):
    from ensemble.fit import Splits, accumulate_gram, fit_joint, fit_species

    spec, model = planted(kind)
    ds = load_default().isel(frame=slice(0, 800, 100)).compute()      # full density: every local environment
    box = np.diag(ds["cell"].values)
    sp = ds["species"].values
    f = np.stack([model.forces(p, box, sp) for p in ds["positions"].values])
    ds = ds.assign(forces=(ds["forces"].dims, f),
                   accelerations=(ds["forces"].dims, f / ds["masses"].values[None, :, None] * CONV))
    gram = accumulate_gram(ds.chunk({"frame": 4}), kind=kind, features=spec, splits=Splits(0.0, 1.0, 0.0, 0.0))
    j, l = spec.quadratic_pairs()
    # exact recovery with columns standardized by their RMS alone (floor 0); the default floor,
    # which holds barely excited columns near zero, still fits the planted forces exactly
    if kind == "conservative":
        fit = fit_joint(gram, ridge=0.0, floor=0.0)
        got = [fit.coef_of(s, spec.block) for s in range(2)]
        assert max(fit.errors[s]["train"] for s in ("H", "O")) < 1e-6
        assert max(fit_joint(gram, ridge=0.0).errors[s]["train"] for s in ("H", "O")) < 1e-5
    else:
        got = [fit_species(gram, s, ridge=0.0, floor=0.0).coef for s in range(2)]
        assert max(fit_species(gram, s, ridge=0.0).errors["train"] for s in range(2)) < 1e-5
    for s in range(2):
        want = np.concatenate([model.A[s], model.B[s][j, l]])       # column x_j x_l, or 1/2 x_f^2: B_jl
        assert_allclose(got[s], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_nve_energy_drift_of_a_fitted_angular_conservative_model():
    """Fit the default many-body conservative model (with its short-range prior) on 40 frames of the
    embedded data and run 600 NVE steps (0.3 ps at 0.5 fs) of the 128 H2O: the total energy
    fluctuates by less than 1e-4 of the potential energy scale and does not drift."""
    import dask

    from ensemble.fit import accumulate_gram, fit_joint
    from ensemble.fit.pipeline import _coefficients, load_fit_config
    from ensemble.features import FeatureSpec
    from ensemble.md import velocity_verlet
    from ensemble.units import AMU_A2_PER_FS2_TO_EV

    cfg = load_fit_config(None, angular="default", kind="conservative")
    spec = FeatureSpec(2, cfg.weights, cfg.angular, "pair", cfg.cutoff_angstrom, 1.0)
    ds = load_default().isel(frame=slice(0, 1000, 25)).compute()
    codes, _ = species_index(ds["species"].values, ["H", "O"])
    boxes = np.tile(np.diag(ds["cell"].values), (ds.sizes["frame"], 1))
    prior = ShortRangePrior(("H", "O"), shortest_distances(ds["positions"].values, boxes, codes, 2))
    with dask.config.set(scheduler="synchronous"):
        gram = accumulate_gram(ds.chunk({"frame": 10}), kind="conservative", features=spec,
                               split=np.zeros(ds.sizes["frame"], np.int64), prior=prior)
    with warnings.catch_warnings():        # ~700 columns: ridge-regularised, as the pipeline does
        warnings.simplefilter("ignore", RuntimeWarning)
        fit = fit_joint(gram, ridge=1e-8)
    assert max(fit.errors[s]["train"] for s in ("H", "O")) < 0.15
    ab = [_coefficients(fit.coef_of(s, spec.block), spec) for s in range(2)]
    model = Model(kind="conservative", species=("H", "O"), masses=(1.00794, 15.9994), weights=cfg.weights,
                  A=tuple(x[0] for x in ab), B=tuple(x[1] for x in ab), cutoff_angstrom=cfg.cutoff_angstrom,
                  angular=cfg.angular, prior=prior)
    last = load_default().isel(frame=-1).compute()
    masses = last["masses"].values
    fn = model.force_fn(np.diag(last["cell"].values), last["species"].values)
    init_fn, step_fn = velocity_verlet(fn, 0.5, masses)
    state = init_fn(last["positions"].values, last["velocities"].values)

    def total(st):
        return st.potential_energy + 0.5 * AMU_A2_PER_FS2_TO_EV * float(np.sum(masses[:, None] * st.velocities ** 2))

    e = [total(state)]
    for _ in range(600):
        state = step_fn(state)
        e.append(total(state))
    e = np.array(e)
    assert fn.neighbours.builds > 1                       # the Verlet list was rebuilt along the way
    assert np.isfinite(e).all()
    # velocity Verlet at 0.5 fs: bounded fluctuations (measured ~0.01 eV for 384 atoms), no drift
    assert np.abs(e - e[0]).max() < 1e-4 * abs(e[0])
    drift = np.polyfit(np.arange(len(e)) * 0.5e-3, e, 1)[0]        # eV / ps
    assert abs(drift) < 0.1


@pytest.mark.parametrize("cutoff,angular,quadratic", [(None, False, "pair"), (4.9, False, "pair"), (4.9, True, "pair"),
                                                      (4.9, True, "pair+radial")])
def test_blas_conservative_rows_equal_the_scatter_kernel(water, cutoff, angular, quadratic):
    from ensemble.fit.design import conservative_rows_blas, support_colmap

    ds = water.isel(atom=slice(0, 120))
    pos = ds["positions"].values[0]
    codes, _ = species_index(ds["species"].values, ["H", "O"])
    spec = FeatureSpec(2, WS, ANG if angular else None, quadratic, cutoff, 1.0)
    terms = frame_terms(pos, np.diag(ds["cell"].values), codes, spec)
    a = conservative_feature_rows(terms, codes, spec, np.zeros((360, 2 * spec.block + 1)))
    b = conservative_rows_blas(terms, codes, spec, np.zeros((360, 2 * spec.block + 1)))
    assert np.abs(a).max() > 1 and not a[:, -1].any()
    assert_allclose(b, a, rtol=0, atol=1e-12 * np.abs(a).max())
    # rows placed anywhere (atom i at rows[i]) in a buffer full of garbage: the design columns of
    # those rows are written, nothing else is touched
    rows = 3 * np.random.default_rng(1).permutation(130)[:120] + 1
    buf = np.full((400, 2 * spec.block + 3), np.nan)
    conservative_rows_blas(terms, codes, spec, buf, rows)
    at = (rows[:, None] + np.arange(3)).ravel()
    assert_allclose(buf[at, :2 * spec.block], a[:, :2 * spec.block], rtol=0, atol=1e-12 * np.abs(a).max())
    assert np.isnan(buf[:, 2 * spec.block:]).all() and np.isnan(np.delete(buf, at, axis=0)).all()
    # a column map: each species' support written compactly after one free column, the rest untouched
    colmap, support = support_colmap(spec, first=1)
    buf = np.full((360, 2 * spec.block + 1), np.nan)
    conservative_rows_blas(terms, codes, spec, buf, colmap=colmap)
    for sp in range(2):
        rs = (3 * np.flatnonzero(codes == sp)[:, None] + np.arange(3)).ravel()
        got = buf[rs]
        assert_allclose(got[:, 1:1 + support[sp].size], a[rs][:, support[sp]], rtol=0, atol=1e-12 * np.abs(a).max())
        assert np.isnan(got[:, 0]).all() and np.isnan(got[:, 1 + support[sp].size:]).all()


def test_pair_rows_refuse_quadratic_columns_out_of_triu_order(water):
    """The pair rows form quadratic column q from the pair (j, l) that np.triu_indices puts there; a
    list of pairs in any other order would be written to the wrong columns, so it is refused."""
    from ensemble.fit.design import conservative_pair_rows

    ds = water.isel(atom=slice(0, 30))
    codes, _ = species_index(ds["species"].values, ["H", "O"])
    spec = FeatureSpec(2, WS, None, "pair", 4.9, 1.0)
    terms = frame_terms(ds["positions"].values[0], np.diag(ds["cell"].values), codes, spec)
    qj, ql = spec.quadratic_pairs()
    out = np.zeros((90, 2 * spec.block))
    args = (codes, terms.x, terms.start, terms.nb, terms.geo, terms.g, 2, spec.block, spec.n_features)
    tail = (3 * np.arange(30, dtype=np.int64), np.tile(np.arange(2 * spec.block, dtype=np.int64), (2, 1)), out)
    conservative_pair_rows(*args, qj, ql, *tail)
    assert np.abs(out).max() > 1
    with pytest.raises(ValueError, match="triu_indices"):
        conservative_pair_rows(*args, qj[::-1].copy(), ql[::-1].copy(), *tail)
    with pytest.raises(ValueError, match="triu_indices"):
        conservative_pair_rows(*args, qj[:-1].copy(), ql[:-1].copy(), *tail)


def test_degree_rows_turn_into_the_legendre_gram(water):
    """The reduction writes the conservative angular columns per monomial degree p and turns their
    Gram matrix into Legendre orders once: against the Legendre rows themselves, column by column
    (P_0 = 1, P_1 = x, P_2 = (3 x^2 - 1) / 2, P_3 = (5 x^3 - 3 x) / 2) and as Gram matrices."""
    from ensemble.fit.design import conservative_rows_blas, degree_rows, legendre_gram

    ds = water.isel(atom=slice(0, 120))
    codes, _ = species_index(ds["species"].values, ["H", "O"])
    spec = FeatureSpec(2, WS, ANG, "pair", 4.9, 1.0)
    terms = frame_terms(ds["positions"].values[0], np.diag(ds["cell"].values), codes, spec)
    assert degree_rows(spec)
    lg = conservative_rows_blas(terms, codes, spec, np.zeros((360, 2 * spec.block + 1)))
    dg = conservative_rows_blas(terms, codes, spec, np.zeros((360, 2 * spec.block + 1)), legendre=False)
    scale = np.abs(lg).max()
    psi0 = spec.p + 2 * ANG.n_radial                 # first psi column of block 0; 4 orders per channel
    n_ch = len(ANG.channels(2))
    psi = np.concatenate([s * spec.block + psi0 + np.arange(4 * n_ch) for s in range(2)])
    other = np.setdiff1d(np.arange(2 * spec.block + 1), psi)
    assert_allclose(dg[:, other], lg[:, other], rtol=0, atol=1e-13 * scale)
    p0, p1, p2, p3 = (dg[:, psi[o::4]] for o in range(4))
    l0, l1, l2, l3 = (lg[:, psi[o::4]] for o in range(4))
    assert_allclose(l0, p0, rtol=0, atol=1e-12 * scale)
    assert_allclose(l1, p1, rtol=0, atol=1e-12 * scale)
    assert_allclose(l2, 1.5 * p2 - 0.5 * p0, rtol=0, atol=1e-12 * scale)
    assert_allclose(l3, 2.5 * p3 - 1.5 * p1, rtol=0, atol=1e-12 * scale)
    assert np.abs(p2 - l2).max() > 0.1 * np.abs(l2).max()        # the two bases differ
    dg[:, -1] = lg[:, -1] = np.arange(360.0)                      # a target column, left as it is
    want = lg.T @ lg
    assert_allclose(legendre_gram(dg.T @ dg, spec), want, rtol=0, atol=1e-11 * np.abs(want).max())
    # quadratic columns of angular features need their values in Legendre orders: no degree rows
    spec_q = FeatureSpec(2, WS, ANG, "pair+radial", 4.9, 1.0)
    assert not degree_rows(spec_q)
    with pytest.raises(ValueError, match="per monomial degree"):
        conservative_rows_blas(frame_terms(ds["positions"].values[0], np.diag(ds["cell"].values), codes, spec_q),
                               codes, spec_q, np.zeros((360, 2 * spec_q.block + 1)), legendre=False)


@pytest.mark.parametrize("cutoff,angular,quadratic", [(None, False, "pair"), (4.9, True, "pair"),
                                                      (4.9, True, "pair+radial")])
def test_conservative_rows_vanish_outside_each_species_support(water, cutoff, angular, quadratic):
    """The Gram reduction multiplies only FeatureSpec.conservative_support(s) of species s's rows:
    on real rows every other column is exactly zero, no column inside it is, and it leaves out part
    of the other species' block (the features an atom of s does not move as a neighbour). It also
    copies the twins (conservative_twins) instead of multiplying them: they equal their originals."""
    from ensemble.fit.design import conservative_rows_blas

    ds = water.isel(atom=slice(0, 120))
    codes, _ = species_index(ds["species"].values, ["H", "O"])
    spec = FeatureSpec(2, WS, ANG if angular else None, quadratic, cutoff, 1.0)
    terms = frame_terms(ds["positions"].values[0], np.diag(ds["cell"].values), codes, spec)
    z = conservative_rows_blas(terms, codes, spec, np.zeros((360, 2 * spec.block)))
    for s in range(2):
        sup = spec.conservative_support(s)
        own = np.arange(s * spec.block, (s + 1) * spec.block)
        assert np.isin(own, sup).all() and 0 < 2 * spec.block - sup.size < spec.block
        at = (3 * np.flatnonzero(codes == s)[:, None] + np.arange(3)).ravel()
        zs = z[at]
        assert not np.delete(zs, sup, axis=1).any()
        assert (np.abs(zs[:, sup]).max(axis=0) > 0).all()
    # twins: the cross-species two-body columns of one block equal their originals in the other
    twin, orig = spec.conservative_twins()
    assert twin.size == len(WS) + (ANG.n_radial if angular else 0)      # phi[H] / phi[O] weights, rho radials
    assert np.array_equal(z[:, twin], z[:, orig]) and np.abs(z[:, twin]).max() > 0
    assert (twin >= spec.block).all() and (orig < spec.block).all()


def test_frame_terms_without_angular_values_give_the_same_linear_rows(water):
    """frame_terms(angular_values=False), what the reduction uses for linear angular columns: the
    pair features alone in x, the same moments and radial values, the same design rows; the
    layouts whose quadratic columns need the angular values refuse it."""
    from ensemble.fit.design import conservative_rows_blas

    ds = water.isel(atom=slice(0, 120))
    codes, _ = species_index(ds["species"].values, ["H", "O"])
    pos, box = ds["positions"].values[0], np.diag(ds["cell"].values)
    spec = FeatureSpec(2, WS, ANG, "pair", 4.9, 1.0)
    full = frame_terms(pos, box, codes, spec)
    lean = frame_terms(pos, box, codes, spec, angular_values=False)
    assert full.x.shape == (120, spec.n_features) and lean.x.shape == (120, spec.p) and lean.ang.x.shape == (120, 0)
    assert np.array_equal(lean.x, full.x[:, :spec.p]) and np.array_equal(lean.ang.t, full.ang.t)
    assert np.array_equal(lean.ang.rad, full.ang.rad)
    for legendre in (True, False):
        a = conservative_rows_blas(full, codes, spec, np.zeros((360, 2 * spec.block)), legendre=legendre)
        b = conservative_rows_blas(lean, codes, spec, np.zeros((360, 2 * spec.block)), legendre=legendre)
        assert np.abs(a).max() > 1 and np.array_equal(a, b)
    spec_q = FeatureSpec(2, WS, ANG, "pair+radial", 4.9, 1.0)
    with pytest.raises(ValueError, match="angular_values=True"):
        conservative_rows_blas(frame_terms(pos, box, codes, spec_q, angular_values=False), codes, spec_q,
                               np.zeros((360, 2 * spec_q.block)))


def test_reduction_with_degree_rows_equals_the_legendre_rows(monkeypatch):
    """accumulate_gram of the many-body conservative kind (rows per monomial degree, turned into
    Legendre orders per chunk; products over each species' support) equals the same reduction
    forced onto Legendre rows and the full Z^T Z of the Legendre rows, with chunks that mix the
    training, validation and test splits."""
    import dask

    import ensemble.fit.gram as gram_mod
    from ensemble.fit import Splits, accumulate_gram

    ds = load_default().isel(frame=slice(0, 8)).compute().chunk({"frame": 5})
    spec = FeatureSpec(2, WS, ANG, "pair", 4.9, 1.0)
    splits = Splits(0.0, 0.5, 0.25, 0.25)
    with dask.config.set(scheduler="synchronous"):
        deg = accumulate_gram(ds, kind="conservative", features=spec, splits=splits)
        monkeypatch.setattr(gram_mod, "degree_rows", lambda spec: False)
        leg = accumulate_gram(ds, kind="conservative", features=spec, splits=splits)
    assert (deg.rows > 0).all() and np.array_equal(deg.rows, leg.rows)
    scale = np.abs(leg.zz).max()
    assert_allclose(deg.zz, leg.zz, rtol=0, atol=1e-11 * scale)
    # and both equal Z^T Z of every column of the Legendre rows, with the forces as the target
    from ensemble.fit.design import conservative_rows_blas
    from ensemble.fit.gram import frame_splits

    codes, _ = species_index(ds["species"].values, ["H", "O"])
    box = np.diag(ds["cell"].values)
    want = np.zeros_like(deg.zz)
    for t, sp in enumerate(frame_splits(8, splits)):
        z = np.zeros((3 * codes.size, 2 * spec.block + 1))
        conservative_rows_blas(frame_terms(ds["positions"].values[t], box, codes, spec), codes, spec, z)
        z[:, -1] = ds["forces"].values[t].ravel()
        for s in range(2):
            zs = z[(3 * np.flatnonzero(codes == s)[:, None] + np.arange(3)).ravel()]
            want[s, sp] += zs.T @ zs
    assert_allclose(deg.zz, want, rtol=0, atol=1e-11 * scale)


@pytest.mark.parametrize("shuffle", [False, True])
def test_pair_terms_once_per_pair_equal_a_direct_sum(water, shuffle):
    """pair_csr_terms evaluates a pair's weights once for both of its entries (the mirror found by a
    per-atom cursor); against numpy per entry, on the CSR lists as built and on lists whose order is
    shuffled (mirrors not where the cursor looks: every entry must then be evaluated on its own)."""
    from ensemble.angular import neighbour_csr
    from ensemble.features import pair_csr_terms
    from ensemble.invariants import neighbour_pairs

    ds = water.isel(atom=slice(0, 150))
    pos = ds["positions"].values[0]
    box = np.diag(ds["cell"].values)
    codes, _ = species_index(ds["species"].values, ["H", "O"])
    start, nb, geo = neighbour_csr(neighbour_pairs(pos, box, 4.0), pos, box, 4.0, 1.0, 150)
    if shuffle:
        rng = np.random.default_rng(3)
        perm = np.concatenate([start[k] + rng.permutation(start[k + 1] - start[k]) for k in range(150)])
        nb, geo = nb[perm], geo[perm]
    kinds, params = WS.arrays()
    phi, g = pair_csr_terms(start, nb, geo, codes, 2, kinds, params)
    r, fc, dfc = geo[:, 3], geo[:, 4], geo[:, 5]
    w = np.stack([np.exp(-r), np.exp(-r ** 2 / 8.0), r ** -2.0], axis=1)           # WS: exp(-r), Gauss 2 Å, r^-2
    dw = np.stack([-np.exp(-r), -r / 4.0 * np.exp(-r ** 2 / 8.0), -2.0 * r ** -3.0], axis=1)
    want_g = (dw * fc[:, None] + w * dfc[:, None]) / r[:, None]
    centre = np.repeat(np.arange(150), np.diff(start))
    want_phi = np.zeros((150, 6))
    np.add.at(want_phi, (centre[:, None], 3 * codes[nb][:, None] + np.arange(3)), w * fc[:, None])
    assert nb.size > 1000 and (fc < 1).any()                      # many entries, some inside the switch
    assert_allclose(g, want_g, rtol=1e-12, atol=1e-15)
    assert_allclose(phi, want_phi, rtol=1e-12)
