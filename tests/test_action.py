"""The action-derived long-step map: kernels against finite differences, the map's structure
(symplectic, time-reversible, the implicit midpoint rule when the learned terms are off), and the
fit recovering exact long-step flows of 1-D oscillators with the same fit code."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from ensemble.fit.action import ActionGram, baseline_coef, errors, pair_gram, solve_action
from ensemble.md.action import (ActionModel, ModelPotential, PairFeatures, action_integrator, default_features,
                                direct_integrator)
from ensemble.md.action_kernels import find_clusters, radial3, shell3, switch3
from ensemble.invariants import neighbour_pairs
from ensemble.model import load_model
from ensemble.units import EV_PER_ANGSTROM_AMU_TO_ANGSTROM_PER_FS2 as EV_TO_INTERNAL

from conftest import DATA, small_water

MODEL = DATA / "models" / "conservative-c5.json"


@pytest.fixture(scope="module")
def small():
    return small_water()


def _fd(fn, x, eps, order=2):
    """Central finite differences of fn (array -> array) with respect to every entry of x
    (error O(eps^2), or O(eps^4) with ``order=4``)."""
    out = []
    for i in range(x.size):
        d = np.zeros_like(x)
        d.flat[i] = eps
        if order == 2:
            out.append((np.asarray(fn(x + d)) - np.asarray(fn(x - d))) / (2 * eps))
        else:
            out.append((-np.asarray(fn(x + 2 * d)) + 8 * np.asarray(fn(x + d)) - 8 * np.asarray(fn(x - d))
                        + np.asarray(fn(x - 2 * d))) / (12 * eps))
    return np.stack(out, axis=-1)


# --------------------------------------------------------------------------- kernels
def test_radial_functions_and_switch_derivatives():
    r = np.linspace(0.71, 2.91, 23)       # away from the switch's knots at 2 and 3 Å (it is C^3, not C^4)
    e = 1e-5
    for f in (lambda x: radial3(0, 2.0, x), lambda x: radial3(1, 0.7, x), lambda x: radial3(2, 3.0, x),
              lambda x: shell3(1.5, 0.2, x), lambda x: switch3(x, 3.0, 1.0)):
        for x in r:
            hi, lo, mid = f(x + e), f(x - e), f(x)
            for k in range(3):
                assert abs((hi[k] - lo[k]) / (2 * e) - mid[k + 1]) < 1e-6 * max(1.0, abs(mid[k + 1]))
    # C^3 switch: value 1 and 0 at the ends, derivatives 0 at both ends
    assert switch3(2.0, 3.0, 1.0) == (1.0, 0.0, 0.0, 0.0) and switch3(3.0, 3.0, 1.0) == (0.0, 0.0, 0.0, 0.0)
    assert_allclose(switch3(2.0 + 1e-9, 3.0, 1.0), (1.0, 0.0, 0.0, 0.0), atol=1e-5)      # continuous
    assert_allclose(switch3(3.0 - 1e-9, 3.0, 1.0), (0.0, 0.0, 0.0, 0.0), atol=1e-5)


@pytest.mark.parametrize("features", [
    default_features(("H", "O")),
    PairFeatures(("H", "O"), (("exp", 2.0, 0.0), ("gauss", 0.7, 0.0), ("shell", 1.5, 0.2), ("power", 3.0, 0.0)),
                 3.0, 1.0, ("K", "F"), "all")])
def test_feature_gradients_match_finite_differences(small, features):
    pos, vel, species, masses, box = small
    bound = features.bind(species, masses, box)
    t, dq, dv = bound.columns(pos, vel)
    assert np.abs(t).max() > 0 and np.abs(dq).max() > 0
    fq = _fd(lambda x: bound.columns(x.reshape(pos.shape), vel)[0], pos.ravel(), 1e-6).reshape(dq.shape)
    fv = _fd(lambda x: bound.columns(pos, x.reshape(vel.shape))[0], vel.ravel(), 1e-6).reshape(dv.shape)
    assert_allclose(dq, fq, atol=1e-7 * np.abs(dq).max())
    assert_allclose(dv, fv, atol=1e-7 * np.abs(dv).max())
    # the contracted kernel the map uses: sum_c a_c dT_c
    coef = np.random.default_rng(0).normal(size=features.n_features)
    gq, gv, total = bound.gradients(pos, vel, *features.split(coef))
    assert_allclose(gq, np.einsum("c,cnk->nk", coef, dq), rtol=1e-12, atol=1e-14 * np.abs(gq).max())
    assert_allclose(gv, np.einsum("c,cnk->nk", coef, dv), rtol=1e-12, atol=1e-14 * np.abs(gv).max())
    assert total == pytest.approx(coef @ t, rel=1e-12)


def test_features_are_even_in_the_velocities(small):
    pos, vel, species, masses, box = small
    bound = default_features(("H", "O")).bind(species, masses, box)
    t1, dq1, dv1 = bound.columns(pos, vel)
    t2, dq2, dv2 = bound.columns(pos, -vel)
    assert_allclose(t2, t1, rtol=1e-13)
    assert_allclose(dq2, dq1, rtol=1e-13, atol=1e-16)
    assert_allclose(dv2, -dv1, rtol=1e-13, atol=1e-16)


def test_model_cluster_hessian_is_the_hessian_when_everything_is_one_cluster(small):
    """With every atom in one cluster and every pair kept, the cluster blocks are the full
    Hessian of E = sum_k H(phi_k): compare with finite differences of the forces."""
    pos, _, species, _, box = small
    pos = pos[:6]                    # two molecules
    species = species[:6]
    pot = ModelPotential(load_model(MODEL), box, species)
    pot.forces(pos)
    members, offsets, cluster_of = find_clusters(pos, box, neighbour_pairs(pos, box, -1.0), 20.0)
    assert len(offsets) == 2
    flat, boff = pot.cluster_hessian(pos, members, offsets, cluster_of, 20.0)
    hess = flat.reshape(18, 18)
    fd = -_fd(lambda x: pot.forces(x.reshape(pos.shape))[0].ravel(), pos.ravel(), 1e-5)
    assert_allclose(hess, fd, atol=2e-5 * np.abs(fd).max())
    assert_allclose(hess, hess.T, atol=1e-10 * np.abs(hess).max())


def test_feature_cluster_hessians_are_the_second_derivatives(small):
    """With one cluster holding every atom, the blocks are the full second derivatives of
    sum_c a_c T_c in (q, q), (v, q) and (v, v): compare with differences of the gradients."""
    pos, vel, species, masses, box = small
    pos, vel, species, masses = pos[:6], vel[:6], species[:6], masses[:6]
    for feats in (default_features(("H", "O")),
                  PairFeatures(("H", "O"), (("exp", 2.0, 0.0), ("gauss", 0.7, 0.0), ("power", 3.0, 0.0)), 3.0, 1.0,
                               ("K", "F"), "all")):
        bound = feats.bind(species, masses, box)
        a_k, a_f = feats.split(np.random.default_rng(2).normal(size=feats.n_features))
        members, offsets, cluster_of = find_clusters(pos, box, neighbour_pairs(pos, box, -1.0), 20.0)
        tqq, tvq, tvv, _ = bound.cluster_hessians(pos, vel, a_k, a_f, members, offsets, cluster_of)
        fqq = _fd(lambda x: bound.gradients(x.reshape(pos.shape), vel, a_k, a_f)[0].ravel(), pos.ravel(), 1e-6)
        fvq = _fd(lambda x: bound.gradients(x.reshape(pos.shape), vel, a_k, a_f)[1].ravel(), pos.ravel(), 1e-6)
        fvv = _fd(lambda x: bound.gradients(pos, x.reshape(vel.shape), a_k, a_f)[1].ravel(), vel.ravel(), 1e-6)
        for got, want in ((tqq, fqq), (tvq, fvq), (tvv, fvv)):
            assert np.abs(want).max() > 0
            assert_allclose(got.reshape(18, 18), want, atol=1e-6 * np.abs(want).max())


def test_clusters_are_molecules(small):
    pos, _, _, _, box = small
    members, offsets, cluster_of = find_clusters(pos, box, neighbour_pairs(pos, box, -1.0), 1.3)
    assert np.diff(offsets).tolist() == [3, 3, 3, 3]
    assert cluster_of.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_model_potential_equals_force_fn(small):
    pos, _, species, _, box = small
    model = load_model(MODEL)
    f1, e1 = ModelPotential(model, box, species).forces(pos)
    f2, e2 = model.force_fn(box, np.array(species))(pos)
    np.testing.assert_array_equal(f1, f2)
    assert e1 == e2


# --------------------------------------------------------------------------- the map's structure
def _map(small, h=2.0, coef_scale=0.0, tol=1e-14):
    pos, vel, species, masses, box = small
    feats = default_features(("H", "O"))
    coef = np.random.default_rng(5).normal(size=feats.n_features) * coef_scale
    am = ActionModel("action", h, feats, coef)
    pot = ModelPotential(load_model(MODEL), box, species)
    init_fn, step_fn = action_integrator(pot, am, masses, species, box, tol_angstrom=tol, max_iter=60)

    def phi(q, v):
        s = step_fn(init_fn(q, v))
        return s.positions, s.velocities, s.aux

    return phi


@pytest.fixture(scope="module")
def learned_scale(small):
    """A coefficient scale that makes the learned terms up to ~3 % of the midpoint step (not a
    fit: the structure must hold for any S)."""
    pos, vel, species, masses, box = small
    feats = default_features(("H", "O"))
    coef = np.random.default_rng(5).normal(size=feats.n_features)
    gq, gv, _ = feats.bind(species, masses, box).gradients(pos, vel, *feats.split(coef))
    h = 2.0
    step_q = h ** 3 * np.abs(gv / masses[:, None]).max()
    return 0.03 * h * np.abs(vel).max() / step_q


def test_map_is_symplectic(small, learned_scale):
    """J^T Omega J = Omega for the map (q, p) -> (q', p'), J by central differences, with learned
    terms switched on (random coefficients)."""
    pos, vel, species, masses, box = small
    phi = _map(small, coef_scale=learned_scale)
    n3 = pos.size
    sm = np.sqrt(masses)[:, None]
    # mass-scaled canonical coordinates Q = sqrt(m) q, P = p / sqrt(m) = sqrt(m) v
    x0 = np.concatenate([(sm * pos).ravel(), (sm * vel).ravel()])

    def f(x):
        q1, v1, _ = phi(x[:n3].reshape(pos.shape) / sm, x[n3:].reshape(pos.shape) / sm)
        return np.concatenate([(sm * q1).ravel(), (sm * v1).ravel()])

    jac = _fd(f, x0, 3e-5, order=4)
    omega = np.block([[np.zeros((n3, n3)), np.eye(n3)], [-np.eye(n3), np.zeros((n3, n3))]])
    err = np.abs(jac.T @ omega @ jac - omega).max()
    assert err < 1e-8
    # and the map is far from the identity (the check is not empty)
    assert np.abs(jac - np.eye(2 * n3)).max() > 0.1


def test_map_is_time_reversible(small, learned_scale):
    pos, vel, species, masses, box = small
    phi = _map(small, coef_scale=learned_scale)
    q, v = pos, vel
    for _ in range(5):
        q, v, aux = phi(q, v)
        assert aux["residual_angstrom"] < 1e-12
    assert np.abs(q - pos).max() > 0.05
    for _ in range(5):
        q, v, _ = phi(q, -v)
        v = -v
    assert_allclose(q, pos, atol=1e-11)
    assert_allclose(v, vel, atol=1e-12)


def test_zero_coefficients_give_the_implicit_midpoint_rule(small):
    """S = h (K + V): x' = x + h f((x + x') / 2) with f = (v, F / m); solved here independently
    by plain fixed-point iteration at a step where it contracts."""
    pos, vel, species, masses, box = small
    h = 0.5
    q1, v1, aux = _map(small, h=h)(pos, vel)
    f = load_model(MODEL).force_fn(box, np.array(species))
    q, v = pos + h * vel, vel.copy()
    for _ in range(200):
        qb, vb = 0.5 * (pos + q), 0.5 * (vel + v)
        q_new = pos + h * vb
        v_new = vel + h * f(qb)[0] * EV_TO_INTERNAL / masses[:, None]
        if max(np.abs(q_new - q).max(), np.abs(v_new - v).max()) < 1e-15:
            break
        q, v = q_new, v_new
    assert_allclose(q1, q_new, atol=1e-12)
    assert_allclose(v1, v_new, atol=1e-13)
    assert aux["iterations"] >= 2


def test_implicit_midpoint_conserves_a_quadratic_energy_exactly():
    """For a harmonic potential the midpoint rule conserves K + V to round-off at any step."""
    k_ev = 40.0
    pot = _Harmonic1D(k_ev)
    feats = _Features1D("harmonic")
    m = np.array([1.0])
    am = ActionModel("action", 3.0, feats, np.zeros(feats.n_features))
    init_fn, step_fn = action_integrator(pot, am, m, ["X"], np.full(3, 20.0), tol_angstrom=1e-15, max_iter=80)
    s = init_fn(np.array([[0.1, 0.0, 0.0]]), np.array([[0.02, 0.0, 0.0]]))
    e0 = 0.5 * 0.02 ** 2 / EV_TO_INTERNAL + 0.5 * k_ev * 0.1 ** 2
    for _ in range(50):
        s = step_fn(s)
        e = 0.5 * s.velocities[0, 0] ** 2 / EV_TO_INTERNAL + 0.5 * k_ev * s.positions[0, 0] ** 2
        assert e == pytest.approx(e0, rel=1e-12)


def test_direct_predictor_with_verlet_coefficients_is_one_verlet_step(small):
    """The direct map with cq = [1, 0...], cv = [1, 0...] is q + h v + h^2/2 a, v + h a."""
    pos, vel, species, masses, box = small
    feats = default_features(("H", "O"))
    c = np.zeros(2 * (feats.n_features + 1))
    c[0] = c[feats.n_features + 1] = 1.0
    pot = ModelPotential(load_model(MODEL), box, species)
    init_fn, step_fn = direct_integrator(pot, ActionModel("direct", 1.0, feats, c), masses, species, box)
    s = step_fn(init_fn(pos, vel))
    acc = pot.forces(pos)[0] * EV_TO_INTERNAL / masses[:, None]
    assert_allclose(s.positions, pos + vel + 0.5 * acc, atol=1e-14)
    assert_allclose(s.velocities, vel + acc, atol=1e-15)


# --------------------------------------------------------------------------- 1-D oscillators
class _Harmonic1D:
    """V = k x^2 / 2 (eV, x in Å) for one particle moving along x."""

    def __init__(self, k_ev):
        self.k = k_ev

    def forces(self, pos):
        f = np.zeros_like(pos)
        f[:, 0] = -self.k * pos[:, 0]
        return f, 0.5 * self.k * float(pos[0, 0] ** 2)

    def cluster_hessian(self, pos, members, offsets, cluster_of, r_short):
        h = np.zeros(9)
        h[0] = self.k
        return h, np.array([0, 9])


class _Morse1D(_Harmonic1D):
    """V = D (1 - exp(-a (x - x0)))^2."""

    def __init__(self, d_ev, a, x0):
        self.d, self.a, self.x0 = d_ev, a, x0

    def forces(self, pos):
        y = np.exp(-self.a * (pos[:, 0] - self.x0))
        f = np.zeros_like(pos)
        f[:, 0] = -2 * self.d * self.a * y * (1 - y)
        return f, float(self.d * (1 - y[0]) ** 2)

    def cluster_hessian(self, pos, members, offsets, cluster_of, r_short):
        y = np.exp(-self.a * (pos[0, 0] - self.x0))
        h = np.zeros(9)
        h[0] = 2 * self.d * self.a ** 2 * y * (2 * y - 1)
        return h, np.array([0, 9])


class _Features1D:
    """A tiny feature set for one particle on a line, even in v: v^(2j) g_k(x), with g_k = x^k
    (harmonic) or z^k, z = 1 - exp(-a (x - x0)) (Morse). Implements the feature protocol of the
    fit (``columns``) and of the map (``split``, ``bind``, ``gradients``, ``cluster_hessians``)."""

    def __init__(self, kind, a=2.2, x0=1.0, powers=(0, 1, 2, 3, 4), orders=tuple(range(9))):
        self.kind, self.a, self.x0 = kind, a, x0
        if kind == "harmonic":
            self.terms = [(0, 2), (1, 0)]                     # x^2 and v^2
        else:
            self.terms = [(j, k) for j in powers for k in orders if j or k]     # v^0 z^0 is a constant
        self.n_features = len(self.terms)
        self.n_k = self.n_features
        self.column_families = [[c] for c in range(self.n_features)]     # every column stands alone

    def _g(self, x):
        """k -> (g_k, g_k', g_k'')"""
        if self.kind == "harmonic":
            return lambda k: (x ** k, k * x ** (k - 1) if k else 0.0, k * (k - 1) * x ** (k - 2) if k > 1 else 0.0)
        y = np.exp(-self.a * (x - self.x0))            # powers of z = 1 - y, the Morse displacement
        z, dz, ddz = 1.0 - y, self.a * y, -self.a ** 2 * y
        return lambda k: (z ** k, k * z ** (k - 1) * dz,
                          k * (k - 1) * z ** (k - 2) * dz * dz + k * z ** (k - 1) * ddz if k > 1 else k * ddz)

    def columns(self, q, v):
        x, u = q[0, 0], v[0, 0]
        g = self._g(x)
        t = np.zeros(self.n_features)
        dq = np.zeros((self.n_features, 1, 3))
        dv = np.zeros((self.n_features, 1, 3))
        for c, (j, k) in enumerate(self.terms):
            gk, dgk, _ = g(k)
            t[c] = u ** (2 * j) * gk
            dq[c, 0, 0] = u ** (2 * j) * dgk
            dv[c, 0, 0] = 2 * j * u ** (2 * j - 1) * gk if j else 0.0
        return t, dq, dv

    def split(self, coef):
        return np.asarray(coef, float), None

    def bind(self, species, masses, box):
        return self

    def gradients(self, q, v, a, _):
        t, dq, dv = self.columns(q, v)
        return np.einsum("c,cnk->nk", a, dq), np.einsum("c,cnk->nk", a, dv), float(a @ t)

    def cluster_hessians(self, q, v, a, _, members, offsets, cluster_of):
        """(T_qq, T_vq, T_vv, offsets) of sum_c a_c T_c as 3x3 blocks (x only)."""
        x, u = q[0, 0], v[0, 0]
        g = self._g(x)
        out = np.zeros((3, 9))
        for c, (j, k) in enumerate(self.terms):
            gk, dgk, ddgk = g(k)
            out[0, 0] += a[c] * u ** (2 * j) * ddgk
            out[1, 0] += a[c] * 2 * j * u ** (2 * j - 1) * dgk if j else 0.0
            out[2, 0] += a[c] * 2 * j * (2 * j - 1) * u ** (2 * j - 2) * gk if j else 0.0
        return out[0], out[1], out[2], np.array([0, 9])


def _exact_pairs(pot, m, x, u, h, exact):
    """(x, u) -> exact state after h: analytic (harmonic) or RK4 with 2000 substeps (Morse)."""
    if exact == "harmonic":
        w = np.sqrt(pot.k * EV_TO_INTERNAL / m)
        return x * np.cos(w * h) + u / w * np.sin(w * h), -x * w * np.sin(w * h) + u * np.cos(w * h)

    def acc(x):
        y = np.exp(-pot.a * (x - pot.x0))
        return -2 * pot.d * pot.a * y * (1 - y) * EV_TO_INTERNAL / m

    n = 2000
    dt = h / n
    for _ in range(n):
        k1x, k1u = u, acc(x)
        k2x, k2u = u + 0.5 * dt * k1u, acc(x + 0.5 * dt * k1x)
        k3x, k3u = u + 0.5 * dt * k2u, acc(x + 0.5 * dt * k2x)
        k4x, k4u = u + dt * k3u, acc(x + dt * k3x)
        x, u = x + dt / 6 * (k1x + 2 * k2x + 2 * k3x + k4x), u + dt / 6 * (k1u + 2 * k2u + 2 * k3u + k4u)
    return x, u


def _fit_1d(pot, feats, h, x, u, exact):
    """The package's fit code (pair rows, Gram, column pruning, ridge on validation) on exact pairs."""
    m = np.array([1.0])
    x1, u1 = _exact_pairs(pot, m[0], x, u, h, exact)
    q0 = np.zeros((x.size, 1, 3))
    v0, q1, v1 = q0.copy(), q0.copy(), q0.copy()
    q0[:, 0, 0], v0[:, 0, 0], q1[:, 0, 0], v1[:, 0, 0] = x, u, x1, u1
    split = np.where(np.arange(x.size) % 5 == 4, 1, 0)
    zz = pair_gram("action", h, m, np.zeros(1, int), 1, q0, v0, q1, v1, split, pot.forces, feats, None)
    rows = np.array([[6 * int(np.sum(split == s)) for s in range(3)]])
    gram = ActionGram(zz=zz, rows=rows, kind="action", dt_fs=h, species=("X",), masses=(1.0,), features=feats,
                      pairs=x.size)
    coef, _ = solve_action(gram)
    return coef, errors(gram, coef), errors(gram, baseline_coef(gram))


def _run_1d(pot, feats, coef, h, x, u, steps):
    m = np.array([1.0])
    am = ActionModel("action", h, feats, coef)
    init_fn, step_fn = action_integrator(pot, am, m, ["X"], np.full(3, 20.0), tol_angstrom=1e-14, max_iter=80)
    s = init_fn(np.array([[x, 0.0, 0.0]]), np.array([[u, 0.0, 0.0]]))
    for _ in range(steps):
        s = step_fn(s)
    return s.positions[0, 0], s.velocities[0, 0]


def test_fit_recovers_the_exact_flow_of_a_harmonic_oscillator():
    """omega h = 1.3: the exact midpoint generating function is h H tan(omega h / 2) / (omega h / 2),
    which v^2 and x^2 terms represent exactly."""
    k = 40.0
    pot, feats = _Harmonic1D(k), _Features1D("harmonic")
    w = np.sqrt(k * EV_TO_INTERNAL)
    h = 1.3 / w
    rng = np.random.default_rng(0)
    x, u = rng.normal(scale=0.1, size=60), rng.normal(scale=0.1 * w, size=60)
    coef, err, base = _fit_1d(pot, feats, h, x, u, "harmonic")
    assert err["X"]["validation"]["relative_dq"] < 1e-9 and err["X"]["validation"]["relative_dv"] < 1e-9
    assert base["X"]["validation"]["relative_dv"] > 1e-2           # the midpoint rule alone is far off
    # the coefficients are the analytic ones: (c - 1) / h^2 times K and V, c = tan(wh/2) / (wh/2)
    c = np.tan(w * h / 2) / (w * h / 2)
    assert_allclose(coef, [(c - 1) / h ** 2 * 0.5 * k * EV_TO_INTERNAL, (c - 1) / h ** 2 * 0.5], rtol=1e-8)
    # and the map follows the exact flow for 100 long steps
    xe, ue = _exact_pairs(pot, 1.0, np.array([0.1]), np.array([0.0]), 100 * h, "harmonic")
    xm, um = _run_1d(pot, feats, coef, h, 0.1, 0.0, 100)
    assert abs(xm - xe[0]) < 1e-9 and abs(um - ue[0]) < 1e-9 * w


def test_fit_recovers_the_exact_flow_of_a_morse_oscillator():
    """Morse (D = 4 eV, a = 2.2 / Å, m = 1 amu: period 10.3 fs at the bottom) at h = 1.6 fs over
    energies up to 0.3 D, where the frequency falls with the amplitude."""
    pot, feats = _Morse1D(4.0, 2.2, 1.0), _Features1D("morse")
    rng = np.random.default_rng(1)
    e = rng.uniform(0.0, 0.3 * 4.0, 200)                              # eV
    phase = rng.uniform(0, 2 * np.pi, 200)
    # start on the energy shell: split e between kinetic and potential at a random phase
    ep = e * np.sin(phase) ** 2
    y = 1 - np.sign(np.cos(phase)) * np.sqrt(ep / 4.0)
    x = 1.0 - np.log(y) / 2.2
    u = np.sign(np.sin(phase)) * np.sqrt(2 * (e - ep) * EV_TO_INTERNAL)
    h = 1.6
    coef, err, base = _fit_1d(pot, feats, h, x, u, "morse")
    val, b = err["X"]["validation"], base["X"]["validation"]
    # one step: errors ~1e-6 Å and Å/fs (the step itself moves ~0.3 Å), < 1e-3 of the midpoint rule's
    assert val["rmse_dq"] < 1e-5 and val["rmse_dv"] < 1e-5
    assert val["relative_dq"] < 1e-3 and val["relative_dv"] < 1e-3 and b["relative_dv"] == 1.0
    # 60 steps (96 fs, ~9 periods) of the map against the exact flow
    x0, u0 = 1.2, 0.0
    xe, ue = _exact_pairs(pot, 1.0, np.array([x0]), np.array([u0]), 60 * h, "morse")
    xm, um = _run_1d(pot, feats, coef, h, x0, u0, 60)
    xi, _ = _run_1d(pot, feats, np.zeros_like(coef), h, x0, u0, 60)
    assert abs(xm - xe[0]) < 2e-3 * 0.2 and abs(xm - xe[0]) < 1e-2 * abs(xi - xe[0])
