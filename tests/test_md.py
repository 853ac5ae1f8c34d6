"""Integrators against analytic cases: Verlet's discrete harmonic frequency, reversibility,
NVE energy, the Nosé-Hoover chain invariant and mean temperature, clipping, COM removal."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from ensemble.md import (clip_forces, kinetic_energy, maxwell_boltzmann, nhc_invariant, nose_hoover_chain,
                         remove_com_velocity, temperature, velocity_verlet)
from ensemble.units import EV_PER_ANGSTROM_AMU_TO_ANGSTROM_PER_FS2 as CONV


def harmonic(k):
    def f(x):
        return -k * x, 0.5 * k * float(np.sum(x * x))
    return f


def anharmonic_cluster(k=1.0, lam=0.5, eps=0.1, s=0.5):
    """Anharmonic wells plus soft Gaussian pair repulsion: smooth, chaotic, forces analytic."""
    def f(x):
        r2 = np.sum(x * x, axis=1)
        e = float(np.sum(0.5 * k * r2 + 0.25 * lam * r2**2))
        force = -(k + lam * r2)[:, None] * x
        d = x[:, None, :] - x[None, :, :]
        dd = np.sum(d * d, axis=-1)
        g = eps * np.exp(-dd / (2 * s * s))
        np.fill_diagonal(g, 0.0)
        e += 0.5 * float(g.sum())
        force += np.einsum("ij,ijc->ic", g, d) / (s * s)
        return force, e
    return f


def test_verlet_oscillates_at_its_discrete_frequency():
    k, m, dt = 2.0, np.array([1.5]), 1.0
    omega = np.sqrt(k / m[0] * CONV)                       # rad/fs
    init, step = velocity_verlet(harmonic(k), dt, m)
    s = init(np.array([[0.3, 0.0, 0.0]]), np.zeros((1, 3)))
    xs = [s.positions[0, 0]]
    for _ in range(400):
        s = step(s)
        xs.append(s.positions[0, 0])
    # velocity Verlet's positions satisfy x_{n+1} - 2 x_n + x_{n-1} = -(omega dt)^2 x_n exactly, so
    # x_n = x_0 cos(n theta) with cos(theta) = 1 - (omega dt)^2 / 2
    theta = np.arccos(1 - 0.5 * (omega * dt) ** 2)
    assert_allclose(xs, 0.3 * np.cos(theta * np.arange(401)), atol=1e-12)


def test_nve_is_time_reversible_and_conserves_energy():
    rng = np.random.default_rng(0)
    n = 32
    masses = rng.choice([1.008, 15.999], size=n)
    x0 = rng.normal(scale=0.6, size=(n, 3))
    v0 = maxwell_boltzmann(masses, 300.0, rng)
    init, step = velocity_verlet(anharmonic_cluster(), 0.25, masses)
    s = init(x0, v0)
    e0 = kinetic_energy(s.velocities, masses) + s.potential_energy
    es = []
    for _ in range(4000):
        s = step(s)
        es.append(kinetic_energy(s.velocities, masses) + s.potential_energy)
    es = np.array(es)
    # bounded fluctuation, no drift: 1 ps at 0.25 fs
    assert np.abs(es - e0).max() < 2e-4 * abs(e0)
    assert abs(es[-500:].mean() - es[:500].mean()) < 2e-5 * abs(e0)
    # reversibility: 400 steps forward, flip velocities, 400 steps back (a chaotic system amplifies
    # round-off exponentially, so longer round trips drift away from the start)
    s = init(x0, v0)
    for _ in range(400):
        s = step(s)
    back = init(s.positions, -s.velocities)
    for _ in range(400):
        back = step(back)
    assert_allclose(back.positions, x0, atol=1e-10)
    assert_allclose(-back.velocities, v0, atol=1e-11)


def test_nhc_invariant_is_conserved():
    # Verlet's own energy error scales as dt^2: 0.05 fs keeps it ~1e-5 eV here, so a thermostat bug
    # (breaking the invariant at the scale of the energy it moves) would show
    rng = np.random.default_rng(1)
    n = 32
    masses = np.full(n, 15.999)
    x0, v0 = rng.normal(scale=0.6, size=(n, 3)), maxwell_boltzmann(masses, 450.0, rng)
    init, step = nose_hoover_chain(anharmonic_cluster(), 0.05, masses, 300.0, tau_fs=20.0, chain_length=4,
                                   sy_order=5, n_respa=2)
    s = init(x0, v0)
    h0 = step.invariant(s)
    worst = 0.0
    physical = []
    for _ in range(10_000):
        s = step(s)
        worst = max(worst, abs(step.invariant(s) - h0))
        physical.append(kinetic_energy(s.velocities, masses) + s.potential_energy)
    assert worst < 1e-6 * abs(h0)
    # the thermostat moved energy in and out ~1000x more than the invariant wandered
    assert worst < 1e-3 * np.ptp(physical)
    # and the chain adds no error of its own: NVE Verlet at the same step errs as much
    nve_init, nve_step = velocity_verlet(anharmonic_cluster(), 0.05, masses)
    e = nve_init(x0, v0)
    e0 = kinetic_energy(e.velocities, masses) + e.potential_energy
    nve_worst = 0.0
    for _ in range(10_000):
        e = nve_step(e)
        nve_worst = max(nve_worst, abs(kinetic_energy(e.velocities, masses) + e.potential_energy - e0))
    assert worst < 3 * nve_worst
    assert s.chain.xi[0] != 0.0                             # the thermostat did act
    assert_allclose(nhc_invariant(s, masses, 300.0), step.invariant(s))


def test_nhc_mean_temperature_is_on_target():
    rng = np.random.default_rng(2)
    n = 48
    masses = rng.choice([1.008, 15.999], size=n)
    init, step = nose_hoover_chain(anharmonic_cluster(), 0.5, masses, 300.0, tau_fs=50.0, chain_length=3)
    s = init(rng.normal(scale=0.6, size=(n, 3)), maxwell_boltzmann(masses, 100.0, rng))
    temps = []
    for i in range(30_000):
        s = step(s)
        if i >= 5_000:
            temps.append(temperature(s.velocities, masses))
    assert abs(np.mean(temps) / 300.0 - 1) < 0.03
    # canonical fluctuations of the kinetic temperature: std/mean = sqrt(2 / N_f) within 30 %
    assert np.std(temps) / np.mean(temps) == pytest.approx(np.sqrt(2 / (3 * n - 3)), rel=0.3)


def test_clipping_caps_and_counts():
    f = np.array([[3.0, 4.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.0, -10.0]])
    out, n = clip_forces(f, 2.0)
    assert n == 2
    assert_allclose(np.linalg.norm(out, axis=1), [2.0, 0.1, 2.0])
    assert_allclose(out[0], [1.2, 1.6, 0.0])
    init, step = velocity_verlet(harmonic(100.0), 0.5, np.ones(2), max_force_ev_per_angstrom=1.0)
    s = init(np.array([[1.0, 0, 0], [0.001, 0, 0]]), np.zeros((2, 3)))
    s = step(step(s))
    assert s.clipped == 3                                    # atom 0 at every force evaluation


def test_maxwell_boltzmann_and_com():
    rng = np.random.default_rng(3)
    masses = np.array([15.999, 1.008, 1.008] * 100)
    v = maxwell_boltzmann(masses, 300.0, rng)
    assert_allclose(temperature(v, masses), 300.0, rtol=1e-12)
    assert_allclose(masses @ v, 0.0, atol=1e-12)
    v2 = maxwell_boltzmann(masses, 300.0, np.random.default_rng(3))
    np.testing.assert_array_equal(v, v2)
    # per-species kinetic temperatures agree (equipartition of the draw) within sampling noise
    t_o = temperature(v[0::3], masses[0::3], dof=300)
    t_h = temperature(np.concatenate([v[1::3], v[2::3]]), masses[1::3].repeat(2), dof=600)
    assert abs(t_o - t_h) < 60
    drift = v + np.array([0.01, -0.02, 0.005])
    assert_allclose(masses @ remove_com_velocity(drift, masses), 0.0, atol=1e-12)
