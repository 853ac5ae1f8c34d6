"""Build a periodic box of rigid-geometry water molecules at liquid density.

The starting structure of every reference run is made here, from a seed: no
coordinates are copied from anywhere. Molecules are inserted one by one at
uniformly random positions with uniformly random orientations and kept only if
they overlap nothing already placed (minimum image). The box is then relaxed and
thermalised by CP2K (FIST, with a thermostat) before any production run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .units import AVOGADRO

#: SPC/Fw equilibrium geometry (Wu, Tepper & Voth, J. Chem. Phys. 124, 024503, 2006)
OH_BOND_ANGSTROM = 1.012
HOH_ANGLE_DEG = 113.24
WATER_MOLAR_MASS_G = 18.01528  # with CP2K's masses 2 * 1.00794 + 15.9994


@dataclass(frozen=True)
class WaterBox:
    """A box of water molecules.

    Attributes
    ----------
    positions : ndarray, shape (3 * n_molecules, 3), Å
        Atoms ordered O, H, H per molecule.
    species : tuple of str, length 3 * n_molecules
    box_angstrom : float
        Edge of the cubic periodic cell, Å.
    seed : int
    """

    positions: np.ndarray
    species: tuple[str, ...]
    box_angstrom: float
    seed: int

    @property
    def n_molecules(self) -> int:
        return len(self.species) // 3

    def write_xyz(self, path: str | Path) -> None:
        """Write a plain xyz file (Å) that CP2K's ``COORD_FILE_FORMAT XYZ`` reads."""
        lines = [str(len(self.species)),
                 f"{self.n_molecules} H2O, cubic box {self.box_angstrom:.6f} angstrom, seed {self.seed}"]
        for s, (x, y, z) in zip(self.species, self.positions):
            lines.append(f"{s:2s} {x:16.10f} {y:16.10f} {z:16.10f}")
        Path(path).write_text("\n".join(lines) + "\n")


def box_edge_for_density(n_molecules: int, density_g_cm3: float = 0.997) -> float:
    """Edge (Å) of the cubic box holding ``n_molecules`` of water at ``density_g_cm3``."""
    volume_cm3 = n_molecules * WATER_MOLAR_MASS_G / AVOGADRO / density_g_cm3
    return float((volume_cm3 * 1e24) ** (1.0 / 3.0))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly distributed rotation matrix (normalised Gaussian quaternion)."""
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _molecule_frame() -> np.ndarray:
    """O at the origin, both H in the xy plane, bisector along +x. Shape (3, 3), Å."""
    half = np.deg2rad(HOH_ANGLE_DEG) / 2
    r = OH_BOND_ANGSTROM
    return np.array([[0.0, 0.0, 0.0],
                     [r * np.cos(half), r * np.sin(half), 0.0],
                     [r * np.cos(half), -r * np.sin(half), 0.0]])


def build_water_box(
    n_molecules: int,
    *,
    seed: int,
    box_angstrom: float | None = None,
    density_g_cm3: float = 0.997,
    min_oo_angstrom: float = 2.5,
    min_intermolecular_angstrom: float = 1.6,
    max_attempts: int = 200_000,
) -> WaterBox:
    """Place ``n_molecules`` water molecules without overlaps in a cubic periodic box.

    Parameters
    ----------
    n_molecules : int
        Number of molecules (any positive number).
    seed : int
        Seed of the random generator; the same seed gives the same box.
    box_angstrom : float, optional
        Cubic box edge in Å. Default: the edge for ``density_g_cm3``.
    min_oo_angstrom, min_intermolecular_angstrom : float
        Smallest allowed O-O distance, and smallest distance between any two atoms
        of different molecules (minimum image), Å.
    """
    if n_molecules < 1:
        raise ValueError(f"n_molecules must be >= 1, got {n_molecules}")
    edge = box_edge_for_density(n_molecules, density_g_cm3) if box_angstrom is None else float(box_angstrom)
    if edge <= 2 * OH_BOND_ANGSTROM:
        raise ValueError(f"box edge {edge} Å is too small for a water molecule")
    rng = np.random.default_rng(seed)
    template = _molecule_frame()
    placed = np.empty((n_molecules, 3, 3))
    n = 0
    attempts = 0
    while n < n_molecules:
        attempts += 1
        if attempts > max_attempts:
            raise RuntimeError(
                f"could not place {n_molecules} molecules in a {edge:.4f} Å box after {max_attempts} "
                f"attempts ({n} placed): the density is too high for min_oo_angstrom={min_oo_angstrom}")
        centre = rng.uniform(0.0, edge, size=3)
        mol = centre + template @ _random_rotation(rng).T
        if n:
            d = mol[:, None, None, :] - placed[None, :n, :, :]      # (3, n, 3, xyz)
            d -= edge * np.round(d / edge)
            r = np.sqrt((d * d).sum(-1))                               # (3, n, 3)
            if r[0, :, 0].min() < min_oo_angstrom or r.min() < min_intermolecular_angstrom:
                continue
        placed[n] = mol
        n += 1
    return WaterBox(positions=placed.reshape(-1, 3), species=("O", "H", "H") * n_molecules,
                    box_angstrom=edge, seed=seed)
