"""Molecular dynamics from small pieces (JAX-MD / ASE style): velocity Verlet, a Nosé-Hoover
chain, force clipping, centre-of-mass drift removal.

Units: positions Å, velocities Å/fs, masses amu, forces eV/Å, energies eV, time fs,
temperature K. A force function maps positions (N, 3) to (forces (N, 3), potential
energy or NaN). Integrators are factories returning ``(init_fn, step_fn)``; states are
frozen dataclasses updated with :func:`dataclasses.replace`.

Nosé-Hoover chain: Martyna, Tuckerman & Klein (Mol. Phys. 87, 1117, 1996) with
Suzuki-Yoshida factorisation of the chain propagator, as in Tuckerman's
"Statistical Mechanics" §4.12 and JAX-MD's ``nvt_nose_hoover``. Its conserved
quantity (:func:`nhc_invariant`) is E_kin + E_pot + sum_j Q_j v_j^2 / 2 +
N_f k T xi_1 + k T sum_{j>1} xi_j.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from .. import thermo
from ..units import AMU_A2_PER_FS2_TO_EV, BOLTZMANN_EV_K, EV_PER_ANGSTROM_AMU_TO_ANGSTROM_PER_FS2

__all__ = ["MDState", "ChainState", "kinetic_energy", "temperature", "clip_forces", "remove_com_velocity",
           "maxwell_boltzmann", "velocity_verlet", "nose_hoover_chain", "thermostatted", "nhc_invariant",
           "SUZUKI_YOSHIDA"]

ForceFn = Callable[[np.ndarray], tuple[np.ndarray, float]]

#: Suzuki-Yoshida weights of order 1, 3, 5, 7
SUZUKI_YOSHIDA = {
    1: (1.0,),
    3: (1.0 / (2 - 2 ** (1 / 3)), 1 - 2.0 / (2 - 2 ** (1 / 3)), 1.0 / (2 - 2 ** (1 / 3))),
    5: tuple([1.0 / (4 - 4 ** (1 / 3))] * 2 + [1 - 4.0 / (4 - 4 ** (1 / 3))] + [1.0 / (4 - 4 ** (1 / 3))] * 2),
    7: (0.784513610477560, 0.235573213359357, -1.17767998417887, 1.31518632068391,
        -1.17767998417887, 0.235573213359357, 0.784513610477560),
}


@dataclass(frozen=True)
class ChainState:
    """Nosé-Hoover chain: positions xi (1), velocities v (1/fs), masses Q (eV fs^2)."""

    xi: np.ndarray
    v: np.ndarray
    q: np.ndarray


@dataclass(frozen=True)
class MDState:
    """Positions (Å), velocities (Å/fs), forces (eV/Å), potential energy (eV), step, and the
    thermostat chain (None in NVE). ``clipped`` counts atom-steps whose force was clipped.
    ``aux`` holds what an integrator carries from step to step besides (for the action map: the
    last midpoint, for its prediction, and the last step's fixed-point iterations)."""

    positions: np.ndarray
    velocities: np.ndarray
    forces: np.ndarray
    potential_energy: float
    step: int = 0
    chain: ChainState | None = None
    clipped: int = 0
    aux: dict | None = None


# --------------------------------------------------------------------------- small physics
def kinetic_energy(velocities: np.ndarray, masses: np.ndarray) -> float:
    """Kinetic energy, eV, of velocities (N, 3) Å/fs and masses (N,) amu (:func:`ensemble.thermo.kinetic_energy`)."""
    return float(thermo.kinetic_energy(velocities, masses))


def temperature(velocities: np.ndarray, masses: np.ndarray, dof: int | None = None) -> float:
    """K, with ``dof`` degrees of freedom (default 3N - 3, the centre of mass fixed)."""
    dof = thermo.degrees_of_freedom(len(masses)) if dof is None else dof
    return float(thermo.temperature(kinetic_energy(velocities, masses), dof))


def clip_forces(forces: np.ndarray, max_force_ev_per_angstrom: float | None) -> tuple[np.ndarray, int]:
    """Scale down every atom's force longer than the maximum to that length; returns (forces, count)."""
    if max_force_ev_per_angstrom is None:
        return forces, 0
    norm = np.linalg.norm(forces, axis=1)
    over = norm > max_force_ev_per_angstrom
    if not over.any():
        return forces, 0
    out = forces.copy()
    out[over] *= (max_force_ev_per_angstrom / norm[over])[:, None]
    return out, int(over.sum())


def remove_com_velocity(velocities: np.ndarray, masses: np.ndarray) -> np.ndarray:
    """Velocities with the centre-of-mass velocity subtracted."""
    return velocities - (masses @ velocities) / masses.sum()


def maxwell_boltzmann(masses: np.ndarray, temperature_K: float, rng: np.random.Generator) -> np.ndarray:
    """Velocities (Å/fs) drawn at ``temperature_K`` with zero total momentum, rescaled so the
    instantaneous temperature (3N - 3 degrees of freedom) is exactly ``temperature_K``."""
    sigma = np.sqrt(BOLTZMANN_EV_K * temperature_K / (masses * AMU_A2_PER_FS2_TO_EV))
    v = remove_com_velocity(rng.normal(size=(len(masses), 3)) * sigma[:, None], masses)
    t = temperature(v, masses)
    return v * np.sqrt(temperature_K / t) if t > 0 else v


def _accel(forces: np.ndarray, masses: np.ndarray) -> np.ndarray:
    return forces / masses[:, None] * EV_PER_ANGSTROM_AMU_TO_ANGSTROM_PER_FS2


# --------------------------------------------------------------------------- integrators
def velocity_verlet(force_fn: ForceFn, dt_fs: float, masses, *, max_force_ev_per_angstrom: float | None = None):
    """NVE velocity Verlet. Returns (init_fn(positions, velocities) -> MDState, step_fn(state) -> MDState)."""
    masses = np.asarray(masses, dtype=float)
    dt = float(dt_fs)

    def forces_of(positions):
        f, e = force_fn(positions)
        f, n = clip_forces(f, max_force_ev_per_angstrom)
        return f, e, n

    def init_fn(positions, velocities) -> MDState:
        f, e, n = forces_of(np.asarray(positions, float))
        return MDState(np.asarray(positions, float), np.asarray(velocities, float), f, e, 0, None, n)

    def step_fn(state: MDState) -> MDState:
        v_half = state.velocities + 0.5 * dt * _accel(state.forces, masses)
        x = state.positions + dt * v_half
        f, e, n = forces_of(x)
        v = v_half + 0.5 * dt * _accel(f, masses)
        return replace(state, positions=x, velocities=v, forces=f, potential_energy=e, step=state.step + 1,
                       clipped=state.clipped + n)

    return init_fn, step_fn


def _chain_half_step(chain: ChainState, ke2: float, dof: int, kt: float, dt_half: float, n_respa: int,
                     weights) -> tuple[ChainState, float]:
    """Propagate the chain over dt_half; returns the new chain and the velocity scale factor.

    ``ke2`` is twice the kinetic energy (eV)."""
    xi, v, q = chain.xi.copy(), chain.v.copy(), chain.q
    m = len(v)
    scale = 1.0

    def g(k, ke2_now):
        if k == 0:
            return (ke2_now - dof * kt) / q[0]
        return (q[k - 1] * v[k - 1] ** 2 - kt) / q[k]

    for _ in range(n_respa):
        for w in weights:
            d = w * dt_half / n_respa
            v[m - 1] += 0.5 * d * g(m - 1, ke2)
            for k in range(m - 2, -1, -1):
                e = np.exp(-0.25 * d * v[k + 1])
                v[k] = (v[k] * e + 0.5 * d * g(k, ke2)) * e
            s = np.exp(-d * v[0])
            scale *= s
            ke2 *= s * s
            xi += d * v
            for k in range(m - 1):
                e = np.exp(-0.25 * d * v[k + 1])
                v[k] = (v[k] * e + 0.5 * d * g(k, ke2)) * e
            v[m - 1] += 0.5 * d * g(m - 1, ke2)
    return ChainState(xi, v, q), scale


def nose_hoover_chain(force_fn: ForceFn, dt_fs: float, masses, temperature_K: float, *, tau_fs: float = 100.0,
                      chain_length: int = 3, sy_order: int = 3, n_respa: int = 1, dof: int | None = None,
                      max_force_ev_per_angstrom: float | None = None):
    """NVT: velocity Verlet wrapped in half steps of a Nosé-Hoover chain thermostat.

    Q_1 = N_f k T tau^2, Q_j = k T tau^2 (tau_fs: the thermostat's time scale).
    Returns (init_fn(positions, velocities) -> MDState, step_fn(state) -> MDState).
    """
    vv_init, vv_step = velocity_verlet(force_fn, dt_fs, masses, max_force_ev_per_angstrom=max_force_ev_per_angstrom)
    return thermostatted(vv_init, vv_step, dt_fs, masses, temperature_K, tau_fs=tau_fs, chain_length=chain_length,
                         sy_order=sy_order, n_respa=n_respa, dof=dof)


def thermostatted(inner_init, inner_step, dt_fs: float, masses, temperature_K: float, *, tau_fs: float = 100.0,
                  chain_length: int = 3, sy_order: int = 3, n_respa: int = 1, dof: int | None = None):
    """NVT around any NVE step of length ``dt_fs`` (velocity Verlet, the action map): half a
    step of the Nosé-Hoover chain, the inner step, half a step of the chain.

    Returns (init_fn(positions, velocities) -> MDState, step_fn(state) -> MDState); the step
    function's ``invariant(state)`` is the chain's conserved quantity.
    """
    masses = np.asarray(masses, dtype=float)
    if sy_order not in SUZUKI_YOSHIDA:
        raise ValueError(f"sy_order must be one of {sorted(SUZUKI_YOSHIDA)}, got {sy_order}")
    if chain_length < 1 or tau_fs <= 0 or temperature_K <= 0:
        raise ValueError("chain_length >= 1, tau_fs > 0 and temperature_K > 0 are required")
    nf = 3 * len(masses) - 3 if dof is None else int(dof)
    kt = BOLTZMANN_EV_K * float(temperature_K)
    q = np.full(chain_length, kt * tau_fs**2)
    q[0] *= nf
    weights = SUZUKI_YOSHIDA[sy_order]
    half = 0.5 * float(dt_fs)

    def init_fn(positions, velocities) -> MDState:
        s = inner_init(positions, velocities)
        return replace(s, chain=ChainState(np.zeros(chain_length), np.zeros(chain_length), q))

    def thermostat(state: MDState) -> MDState:
        ke2 = 2.0 * kinetic_energy(state.velocities, masses)
        chain, scale = _chain_half_step(state.chain, ke2, nf, kt, half, n_respa, weights)
        return replace(state, velocities=state.velocities * scale, chain=chain)

    def step_fn(state: MDState) -> MDState:
        return thermostat(inner_step(thermostat(state)))

    def invariant(state: MDState) -> float:
        return nhc_invariant(state, masses, temperature_K, nf)

    step_fn.invariant = invariant
    for name in ("aux_arrays",):
        if hasattr(inner_init, name):
            setattr(init_fn, name, getattr(inner_init, name))
    return init_fn, step_fn


def nhc_invariant(state: MDState, masses, temperature_K: float, dof: int | None = None) -> float:
    """Conserved quantity of the Nosé-Hoover chain dynamics (eV)."""
    masses = np.asarray(masses, float)
    nf = 3 * len(masses) - 3 if dof is None else int(dof)
    kt = BOLTZMANN_EV_K * float(temperature_K)
    c = state.chain
    return (kinetic_energy(state.velocities, masses) + state.potential_energy + 0.5 * float(np.sum(c.q * c.v**2))
            + nf * kt * c.xi[0] + kt * float(np.sum(c.xi[1:])))
