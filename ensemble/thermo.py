"""Kinetic energy and temperature: the one place their formulas live.

Velocities Å/fs, masses amu, energies eV, temperatures K. Arrays may carry leading axes
(frames): the atom and xyz axes are the last two.
"""

from __future__ import annotations

import numpy as np

from .units import AMU_A2_PER_FS2_TO_EV, BOLTZMANN_EV_K

__all__ = ["atom_kinetic_energy", "kinetic_energy", "temperature", "degrees_of_freedom"]


def atom_kinetic_energy(velocities, masses):
    """Kinetic energy of each atom, eV: velocities (..., N, 3) Å/fs, masses (N,) amu -> (..., N)."""
    v = np.asarray(velocities, dtype=float)
    return 0.5 * AMU_A2_PER_FS2_TO_EV * np.asarray(masses, dtype=float) * np.einsum("...i,...i->...", v, v)


def kinetic_energy(velocities, masses):
    """Total kinetic energy, eV: (..., N, 3) -> (...) (a float for one frame)."""
    out = atom_kinetic_energy(velocities, masses).sum(axis=-1)
    return float(out) if np.ndim(out) == 0 else out


def degrees_of_freedom(n_atoms: int, com_fixed: bool = True) -> int:
    """3N, less 3 when the centre of mass is fixed (as CP2K counts, and our MD removes its drift)."""
    return max(3 * int(n_atoms) - (3 if com_fixed else 0), 1)


def temperature(kinetic_ev, dof: int):
    """Temperature, K, of a kinetic energy (eV) shared by ``dof`` degrees of freedom: 2 KE / (dof k_B)."""
    out = 2.0 * np.asarray(kinetic_ev, dtype=float) / (dof * BOLTZMANN_EV_K)
    return float(out) if np.ndim(out) == 0 else out
