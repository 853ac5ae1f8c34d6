"""Multiple time stepping (ensemble.md.respa): both splits' fast energies against finite
differences, against the full model where molecules do not see each other and against the
definition (H of the short-range features plus the mean environment); the map's structure
(symplectic, time-reversible, velocity Verlet at one inner step); the impulse resonance of a
two-spring oscillator against the analytic product of its stages; runs of the pair and the
many-body demo model, resume and settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from numpy.testing import assert_allclose

from ensemble.cli import main
from ensemble.md import initial_state, simulate
from ensemble.md.integrators import velocity_verlet
from ensemble.md.respa import default_inner_steps, intramolecular_split, respa, short_range_split
from ensemble.model import ModelError, load_model
from ensemble.units import EV_PER_ANGSTROM_AMU_TO_ANGSTROM_PER_FS2 as CONV
from conftest import DATA, embedded_store, interrupted_and_resumed, small_water
from test_manybody import random_manybody

MODEL = DATA / "models" / "conservative-c5.json"
MANYBODY = DATA / "models" / "manybody-demo.json"


@pytest.fixture(scope="module")
def small():
    pos, vel, species, masses, box = small_water()
    return pos, vel, np.array(species), masses, box


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return embedded_store(tmp_path_factory.mktemp("respa") / "ref.zarr", 200, 212, 12)


def _energy_gradient_check(fn, pos, eps=1e-5):
    f, _ = fn(pos)
    rng = np.random.default_rng(0)
    for k in rng.choice(len(pos), 5, replace=False):
        for c in range(3):
            d = np.zeros_like(pos)
            d[k, c] = eps
            fd = -(fn(pos + d)[1] - fn(pos - d)[1]) / (2 * eps)
            assert f[k, c] == pytest.approx(fd, rel=1e-6, abs=1e-7)
    return f


# --------------------------------------------------------------------------- the split
def test_split_pairs_are_the_molecules_and_offsets_the_mean_environment(small):
    pos, _, species, _, box = small
    model = load_model(MODEL)
    split = intramolecular_split(model, pos, box, species)
    assert split.clusters == 4 and len(split.pairs) == 12          # 3 pairs per H2O
    for k, i in split.pairs:
        assert k < i and {species[k], species[i]} <= {"H", "O"}
        d = pos[k] - pos[i]
        d -= box * np.round(d / box)
        assert np.linalg.norm(d) < 1.7                           # O-H ~0.96 Å, H...H ~1.5 Å
    env = model.features(pos, box, species) - model.features_over(pos, box, species, split.pairs)
    for s in ("H", "O"):
        at = species == s
        assert_allclose(split.feature_shift[at], np.broadcast_to(env[at].mean(axis=0), env[at].shape))
    assert np.abs(split.feature_shift).max() > 0.01                 # neighbours within 5 Å: not empty


@pytest.mark.parametrize("which", ["pair", "manybody"])
def test_restricted_forces_are_minus_the_gradient_of_the_restricted_energy(small, which):
    pos, _, species, _, box = small
    model = load_model(MODEL) if which == "pair" else random_manybody("conservative", cutoff=5.0)
    split = intramolecular_split(model, pos, box, species)
    fn = model.restricted_force_fn(box, species, split.pairs, split.feature_shift)
    pos = pos + np.random.default_rng(2).normal(scale=0.05, size=pos.shape)     # off the built geometry
    f = _energy_gradient_check(fn, pos)
    assert np.abs(f).max() > 0.05            # well above the finite-difference tolerance
    # the restricted energy is not the full one (the shift and the missing neighbours matter) ...
    assert abs(fn(pos)[1] - model.energy(pos, box, species)) > 1e-3
    # ... and its momentum is conserved (pairs act along their separations)
    assert_allclose(f.sum(axis=0), 0.0, atol=1e-9)


@pytest.mark.parametrize("which", ["pair", "manybody"])
def test_isolated_molecules_restricted_energy_is_the_full_energy(which):
    """Two molecules 10 Å apart in a 24 Å box see nothing of each other within the cutoff: either
    split then holds the whole model (zero offsets, equal energy and forces)."""
    mol = np.array([[0.0, 0.0, 0.0], [0.757, 0.586, 0.0], [-0.757, 0.586, 0.0]])
    pos = np.concatenate([mol + 2.0, mol @ np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1.0]]) + 12.0])
    species = np.array(["O", "H", "H"] * 2)
    box = np.full(3, 24.0)
    model = load_model(MODEL) if which == "pair" else random_manybody("conservative", cutoff=5.0)
    split = intramolecular_split(model, pos, box, species)
    assert split.clusters == 2 and np.abs(split.feature_shift).max() == 0.0
    f, e = model.restricted_force_fn(box, species, split.pairs, split.feature_shift)(pos)
    ffull, efull = model.force_fn(box, species)(pos)
    assert e == pytest.approx(efull, rel=1e-12)
    assert_allclose(f, ffull, rtol=1e-10, atol=1e-12)
    fast = short_range_split(model, pos, box, species, 2.4, 0.6).fast_model
    assert_allclose(np.concatenate(fast.A), np.concatenate(model.A), rtol=0, atol=0)   # nothing beyond 2.4 Å
    f2, e2 = fast.force_fn(box, species)(pos)
    assert e2 == pytest.approx(efull, rel=1e-12)
    assert_allclose(f2, ffull, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("which", ["pair", "manybody"])
def test_short_range_model_is_h_of_the_short_features_plus_the_environment(small, which):
    """V_fast(q) = sum_k H(x_k^short(q) + c_s) up to a constant: energy differences between two
    configurations computed from the definition (features of the model with its radial functions cut
    at the default split - 4 Å for the pair model, 3.5 Å where the many-body model's angular switch
    begins - plus the species-mean environment) equal the fast model's; its forces are -grad V_fast."""
    pos, _, species, _, box = small
    model = load_model(MODEL) if which == "pair" else load_model(MANYBODY)
    box = np.full(3, 10.2)
    split = short_range_split(model, pos, box, species)
    fast = split.fast_model
    assert split.split_angstrom == (4.0 if which == "pair" else 3.5) and split.width_angstrom == split.split_angstrom / 2
    assert fast.cutoff_angstrom == split.split_angstrom and (fast.angular is None) == (model.angular is None)
    from ensemble.invariants import species_index

    codes, _ = species_index(species, list(model.species))
    env = model.features(pos, box, species) - fast.features(pos, box, species)
    assert np.abs(env).max() > 1e-3                                 # neighbours beyond the split exist

    def by_definition(q):
        x = fast.features(q, box, species)
        e = 0.0
        for s in range(len(model.species)):
            at = codes == s
            xs = x[at] + env[at].mean(axis=0)
            e += float(np.sum(xs @ model.A[s]) + 0.5 * np.sum((xs @ model.B[s]) * xs))
        if model.prior is not None:
            e += model.prior.energy_forces(q, box, codes)[0]
        return e

    q2 = pos + np.random.default_rng(4).normal(scale=0.03, size=pos.shape)
    fn = fast.force_fn(box, species)
    assert fn(q2)[1] - fn(pos)[1] == pytest.approx(by_definition(q2) - by_definition(pos), rel=1e-9, abs=1e-10)
    f = _energy_gradient_check(fn, q2)
    assert np.abs(f).max() > 0.05


def test_short_range_split_refuses_a_split_beyond_the_models_own_switch(small):
    pos, _, species, _, box = small
    with pytest.raises(ValueError, match=r"beyond where the model's pair cutoff starts to switch off \(4 Å\)"):
        short_range_split(load_model(MODEL), pos, box, species, 4.5)
    with pytest.raises(ValueError, match="angular cutoff starts to switch off"):
        short_range_split(load_model(MANYBODY), pos, box, species, 3.8)
    with pytest.raises(ValueError, match="conservative"):
        short_range_split(load_model(DATA / "models" / "agent-paper.json"), pos, box, species)


def test_restricted_force_fn_refuses_bad_input(small):
    pos, _, species, _, box = small
    model = load_model(MODEL)
    with pytest.raises(ModelError, match=r"\(k < i\)"):
        model.restricted_force_fn(box, species, [[3, 1]])
    with pytest.raises(ModelError, match="feature_shift must be finite with shape"):
        model.restricted_force_fn(box, species, [[0, 1]], np.zeros((3, 2)))
    with pytest.raises(ModelError, match="conservative"):
        random_manybody("agent").restricted_force_fn(box, species, [[0, 1]])


# --------------------------------------------------------------------------- the map
def _map(small, h=2.0, n=4, split="molecules"):
    pos, vel, species, masses, box = small
    model = load_model(MODEL)
    if split == "molecules":
        cut = intramolecular_split(model, pos, box, species)
        fast = model.restricted_force_fn(box, species, cut.pairs, cut.feature_shift)
    else:
        fast = short_range_split(model, pos, box, species).fast_model.force_fn(box, species)
    return respa(model.force_fn(box, species), fast, h, n, masses)


def test_one_inner_step_is_velocity_verlet(small):
    pos, vel, species, masses, box = small
    model = load_model(MODEL)
    i1, s1 = _map(small, h=0.5, n=1)
    i2, s2 = velocity_verlet(model.force_fn(box, species), 0.5, masses)
    a, b = i1(pos, vel), i2(pos, vel)
    for _ in range(10):
        a, b = s1(a), s2(b)
    assert_allclose(a.positions, b.positions, rtol=0, atol=1e-12)
    assert_allclose(a.velocities, b.velocities, rtol=0, atol=1e-13)
    assert np.abs(a.positions - pos).max() > 0.01


@pytest.mark.parametrize("split", ["distance", "molecules"])
def test_map_is_symplectic_and_time_reversible(small, split):
    """J^T Omega J = Omega (J by central differences, mass-scaled canonical coordinates) at a 2 fs
    long step with 4 inner steps; forward, momenta flipped, forward again: back at the start."""
    pos, vel, species, masses, box = small
    init_fn, step_fn = _map(small, split=split)
    n3 = pos.size
    sm = np.sqrt(masses)[:, None]

    def f(x):
        s = step_fn(init_fn(x[:n3].reshape(pos.shape) / sm, x[n3:].reshape(pos.shape) / sm))
        return np.concatenate([(sm * s.positions).ravel(), (sm * s.velocities).ravel()])

    x0 = np.concatenate([(sm * pos).ravel(), (sm * vel).ravel()])
    eps = 3e-5
    jac = np.stack([(-f(x0 + 2 * d) + 8 * f(x0 + d) - 8 * f(x0 - d) + f(x0 - 2 * d)) / (12 * eps)
                    for d in np.eye(2 * n3) * eps], axis=-1)
    omega = np.block([[np.zeros((n3, n3)), np.eye(n3)], [-np.eye(n3), np.zeros((n3, n3))]])
    assert np.abs(jac.T @ omega @ jac - omega).max() < 1e-8
    assert np.abs(jac - np.eye(2 * n3)).max() > 0.1

    s = init_fn(pos, vel)
    for _ in range(5):
        s = step_fn(s)
    assert np.abs(s.positions - pos).max() > 0.05
    s = init_fn(s.positions, -s.velocities)
    for _ in range(5):
        s = step_fn(s)
    assert_allclose(s.positions, pos, atol=1e-11)
    assert_allclose(-s.velocities, vel, atol=1e-12)


def _two_spring_map(h, n, k_fast, k_slow, m=1.0):
    """The one-step matrix of the map for x'' = -(k_fast + k_slow) x / m (eV/Å^2, amu), by applying
    it to the unit vectors (the map is linear), and the same matrix as the analytic product
    kick(slow, h/2) [kick(fast, d/2) drift(d) kick(fast, d/2)]^n kick(slow, h/2)."""
    masses = np.array([m])

    def spring(k):
        return lambda q: (-k * q, 0.5 * k * float(np.sum(q * q)))

    init_fn, step_fn = respa(spring(k_fast + k_slow), spring(k_fast), h, n, masses)
    cols = []
    for q0, v0 in ((1.0, 0.0), (0.0, 1.0)):
        s = step_fn(init_fn(np.array([[q0, 0, 0]]), np.array([[v0, 0, 0]])))
        cols.append([s.positions[0, 0], s.velocities[0, 0]])
    numeric = np.array(cols).T
    d = h / n

    def kick(k, t):
        return np.array([[1.0, 0.0], [-k * CONV / m * t, 1.0]])

    inner = kick(k_fast, d / 2) @ np.array([[1.0, d], [0.0, 1.0]]) @ kick(k_fast, d / 2)
    analytic = kick(k_slow, h / 2) @ np.linalg.matrix_power(inner, n) @ kick(k_slow, h / 2)
    return numeric, analytic


def test_two_spring_oscillator_matches_the_analytic_map_and_shows_the_impulse_resonance():
    """The fast spring alone has a 9 fs period (an O-H stretch); a slow spring of 5 % of its
    stiffness is applied as impulses every h. Away from resonance the map is stable (|trace| < 2,
    area preserved). Just below half the fast period the impulses pump the mode (|trace| > 2): with
    the fast flow turning by theta = pi - eta per long step, trace = -2 + eta^2 - 2 a eta / omega
    (a the half-step kick per unit length), unstable for 0 < eta < 2 a / omega, here h in about
    4.28-4.5 fs - the instability that, with its nonlinear relatives near a third of the period,
    bounds the long step of water."""
    m = 1.0
    omega = 2 * np.pi / 9.0                                  # 1/fs
    k_fast = m * omega ** 2 / CONV                           # eV/Å^2
    for h, stable in ((1.0, True), (2.0, True), (4.2, True), (4.4, False)):
        numeric, analytic = _two_spring_map(h, 32, k_fast, 0.05 * k_fast)
        assert_allclose(numeric, analytic, rtol=1e-12, atol=1e-14)
        assert np.linalg.det(numeric) == pytest.approx(1.0, abs=1e-12)
        assert (abs(np.trace(numeric)) < 2) == stable, (h, np.trace(numeric))


def test_default_inner_steps():
    assert [default_inner_steps(h, "molecules") for h in (0.5, 1.0, 2.0, 2.2, 4.0)] == [1, 2, 4, 5, 8]
    assert [default_inner_steps(h) for h in (0.5, 1.0, 2.0, 2.2, 4.0)] == [1, 2, 4, 5, 8]


# --------------------------------------------------------------------------- runs
@pytest.mark.parametrize("which, split", [("pair", "distance"), ("pair", "molecules"), ("manybody", "distance")])
def test_respa_nve_conserves_energy(store, tmp_path, which, split):
    """128 H2O of the embedded data, 2 fs long steps, 100 fs NVE, both models."""
    model = load_model(MODEL if which == "pair" else MANYBODY)
    init = initial_state(f"{store}:5")
    simulate(model, init, steps=50, dt_fs=2.0, stride=1, integrator="respa", out=tmp_path / "r.zarr",
             action_options={"split": split})
    ds = xr.open_zarr(tmp_path / "r.zarr", consolidated=False)
    settings = json.loads(ds.attrs["simulation_settings"])
    assert settings["integrator"] == "respa" and settings["split"] == split
    assert settings["inner_steps"] == 4
    e = ds["conserved_energy"].values
    # the total energy of 384 atoms fluctuates by ~0.5 meV per atom at this step (0.05 at 0.5 fs
    # Verlet), without a trend (a wrong kick, e.g. the slow force counted twice, heats at once)
    assert np.abs(e - e[0]).max() / 384 < 1e-3
    assert abs(e[-10:].mean() - e[:10].mean()) / 384 < 3e-4
    assert 250 < float(ds["thermo_temperature"].mean()) < 400


def test_molecules_split_fails_where_hydrogen_bonds_shorten(store, tmp_path):
    """The many-body demo model shortens some hydrogen bonds to ~1.5 Å: the molecules split leaves
    them to the 2 fs step and the run heats within 0.3 ps, where the distance split holds (above)."""
    model = load_model(MANYBODY)
    init = initial_state(f"{store}:5")
    with pytest.raises(Exception, match="runaway heating|non-finite"):
        simulate(model, init, steps=200, dt_fs=2.0, stride=50, integrator="respa", out=tmp_path / "m.zarr",
                 action_options={"split": "molecules"}, max_temperature_K=1000.0)


def test_respa_nvt_run_resumes_bitwise(store, tmp_path):
    model = load_model(MODEL)
    init = initial_state(f"{store}:5")
    kw = dict(steps=12, dt_fs=2.0, temperature_K=300.0, stride=2, checkpoint_every=4, block_frames=2,
              integrator="respa", action_options={"inner_steps": 3, "split_angstrom": 2.8})
    a, b = interrupted_and_resumed(lambda out, **extra: simulate(model, init, out=out, **kw, **extra), tmp_path, 7)
    for name in ("positions", "velocities", "forces", "potential_energy", "thermo_conserved"):
        np.testing.assert_array_equal(b[name].values, a[name].values)
    settings = json.loads(a.attrs["simulation_settings"])
    assert settings["inner_steps"] == 3 and settings["split_angstrom"] == 2.8


def test_respa_settings_are_checked_before_anything_is_written(store, tmp_path):
    model = load_model(MODEL)
    init = initial_state(f"{store}:5")
    out = tmp_path / "x.zarr"
    with pytest.raises(ValueError, match="breaks the respa splitting"):
        simulate(model, init, steps=2, dt_fs=2.0, integrator="respa", max_force_ev_per_angstrom=10.0, out=out)
    with pytest.raises(ValueError, match="inner-steps must be an integer >= 1"):
        simulate(model, init, steps=2, dt_fs=2.0, integrator="respa", action_options={"inner_steps": 0.5}, out=out)
    with pytest.raises(ValueError, match="expected bond_angstrom, inner_steps, split, split_angstrom"):
        simulate(model, init, steps=2, dt_fs=2.0, integrator="respa", action_options={"tol_angstrom": 1e-9}, out=out)
    with pytest.raises(ValueError, match="split-angstrom: split at 4.5 Å lies beyond"):
        simulate(model, init, steps=2, dt_fs=2.0, integrator="respa", action_options={"split_angstrom": 4.5}, out=out)
    with pytest.raises(ValueError, match="respa split 'atoms'"):
        simulate(model, init, steps=2, dt_fs=2.0, integrator="respa", action_options={"split": "atoms"}, out=out)
    agent = load_model(DATA / "models" / "agent-paper.json")
    with pytest.raises(ValueError, match="use a conservative model"):
        simulate(agent, init, steps=2, dt_fs=2.0, integrator="respa", out=out)
    assert not out.exists()


def test_simulate_command_with_respa(store, tmp_path, capsys):
    out = tmp_path / "c.zarr"
    assert main(["simulate", "--model", str(MODEL), "--init", f"{store}:5", "--integrator", "respa", "--dt-fs", "1.5",
                 "--inner-steps", "3", "--split", "molecules", "--nve", "--steps", "6", "--stride", "2",
                 "--out", str(out)]) == 0
    ds = xr.open_zarr(out, consolidated=False)
    settings = json.loads(ds.attrs["simulation_settings"])
    assert settings["inner_steps"] == 3 and settings["split"] == "molecules" and settings["bond_angstrom"] == 1.3
    assert ds.sizes["frame"] == 4 and float(ds["time"][-1]) == pytest.approx(9.0)
    assert main(["simulate", "--model", str(MODEL), "--init", f"{store}:5", "--inner-steps", "3", "--steps", "2",
                 "--out", str(tmp_path / "d.zarr")]) != 0
    assert "--inner-steps applies to --integrator respa" in capsys.readouterr().err


def test_ensemble_member_runs_respa(store, tmp_path):
    from ensemble.io.store import open_trajectory
    from ensemble.runner import load_ensemble, run_member, validate

    cfg = tmp_path / "e.toml"
    cfg.write_text(f'[ensemble]\nname = "t"\nreference = "{store}"\n[models]\nm = "{MODEL}"\n'
                   '[defaults]\nsteps = 6\nstride = 2\ninit_frame = 5\n'
                   '[[members]]\nintegrator = "respa"\ndt_fs = 2.0\n')
    ens = load_ensemble(cfg)
    assert ens.members[0].integrator == "respa"
    validate(ens)
    summary = run_member(ens.members[0], str(tmp_path / "out"))
    assert summary["status"] == "complete"
    ds = open_trajectory(tmp_path / "out" / "members" / f"{ens.members[0].id}.zarr")
    settings = json.loads(ds.attrs["simulation_settings"])
    assert settings["integrator"] == "respa" and settings["inner_steps"] == 4 and settings["temperature_K"] == 300.0
    assert settings["split"] == "distance" and settings["split_angstrom"] == 4.0 and settings["split_width_angstrom"] == 2.0
    assert ds.sizes["frame"] == 4 and 200 < float(ds["temperature"].mean()) < 450
