"""Per-frame analyses of a trajectory store (reference or learned), lazily with dask.

Each analysis validates its input before touching a frame, does its per-frame work in a
pure numpy function applied with ``xarray.apply_ufunc(..., dask="parallelized")``, and
declares how partial results merge (:data:`MERGE`): per-frame series concatenate along
``frame``, so the same analysis runs on a whole store, on frame chunks in parallel, or
on pieces that are merged afterwards.

Molecules: every H is assigned to its nearest O under minimum image in the reference
frame; an assignment that is ambiguous (second-nearest O almost as close) or that
changes during the run (proton transfer, a broken bond) is reported, never silently
mixed up.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import xarray as xr

from .invariants import orthorhombic_box
from .units import AMU_A2_PER_FS2_TO_EV, BOLTZMANN_EV_K

__all__ = ["Molecules", "assign_molecules", "oh_bonds", "hoh_angles", "species_temperature", "MERGE", "merge",
           "AssignmentWarning"]

#: how each analysis's partial results combine
MERGE = {"oh_bond": "concat(frame)", "hoh_angle": "concat(frame)", "species_temperature": "concat(frame)"}


class AssignmentWarning(UserWarning):
    """Molecule assignment is ambiguous or changes during the run."""


@dataclass(frozen=True)
class Molecules:
    """Water molecules: ``oxygen[m]`` and ``hydrogens[m] = (h1, h2)`` atom indices."""

    oxygen: np.ndarray
    hydrogens: np.ndarray


def _mic(d: np.ndarray, box: np.ndarray) -> np.ndarray:
    return d - box * np.round(d / box)


def _nearest_o(pos: np.ndarray, box: np.ndarray, o_idx: np.ndarray, h_idx: np.ndarray):
    d = _mic(pos[..., h_idx, None, :] - pos[..., None, o_idx, :], box)
    r = np.sqrt((d * d).sum(-1))                         # (..., H, O)
    order = np.argsort(r, axis=-1)
    return order[..., 0], np.take_along_axis(r, order[..., :2], axis=-1)


def assign_molecules(ds: xr.Dataset, frame: int = 0, ambiguity_ratio: float = 0.8) -> Molecules:
    """Assign each H to its nearest O in ``frame``; every O must get exactly two H.

    Raises ValueError when an O gets other than two H; warns (AssignmentWarning) when an H's
    nearest O is not clearly nearer than the second (distance ratio above ``ambiguity_ratio``).
    """
    species = np.array([str(s) for s in ds["species"].values])
    o_idx, h_idx = np.flatnonzero(species == "O"), np.flatnonzero(species == "H")
    if o_idx.size == 0 or h_idx.size != 2 * o_idx.size:
        raise ValueError(f"water needs 2 H per O; the store has {o_idx.size} O and {h_idx.size} H")
    box = orthorhombic_box(ds["cell"].values if "frame" not in ds["cell"].dims else ds["cell"].values[frame])
    pos = np.asarray(ds["positions"].isel(frame=frame).values)
    nearest, r2 = _nearest_o(pos, box, o_idx, h_idx)
    counts = np.bincount(nearest, minlength=o_idx.size)
    if (counts != 2).any():
        bad = int(np.flatnonzero(counts != 2)[0])
        raise ValueError(f"frame {frame}: O atom {int(o_idx[bad])} has {int(counts[bad])} nearest H (expected 2): "
                         "not intact water molecules")
    ratio = r2[:, 0] / r2[:, 1]
    if (ratio > ambiguity_ratio).any():
        h = int(h_idx[np.argmax(ratio)])
        warnings.warn(f"frame {frame}: H atom {h} is {r2[np.argmax(ratio), 0]:.2f} Å from its O and "
                      f"{r2[np.argmax(ratio), 1]:.2f} Å from the next: ambiguous assignment", AssignmentWarning,
                      stacklevel=2)
    hyd = np.stack([h_idx[nearest == m] for m in range(o_idx.size)])
    return Molecules(oxygen=o_idx, hydrogens=hyd)


def _bonds_kernel(pos, box, o, h):
    """(frame, atom, xyz) -> (frame, bond) O-H distances; bond = 2 m + j for H j of molecule m."""
    d = _mic(pos[:, h, :] - pos[:, o, None, :], box)      # (frame, mol, 2, xyz)
    return np.sqrt((d * d).sum(-1)).reshape(pos.shape[0], -1)


def _angles_kernel(pos, box, o, h):
    d = _mic(pos[:, h, :] - pos[:, o, None, :], box)
    a, b = d[:, :, 0], d[:, :, 1]
    cos = (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def _apply(ds, kernel, mol, out_dim):
    if "frame" in ds["cell"].dims:
        raise ValueError("a cell that changes per frame is not supported by this analysis")
    box = orthorhombic_box(ds["cell"].values)
    return xr.apply_ufunc(kernel, ds["positions"], input_core_dims=[["atom", "xyz"]], output_core_dims=[[out_dim]],
                          kwargs={"box": box, "o": mol.oxygen, "h": mol.hydrogens}, dask="parallelized",
                          output_dtypes=[float],
                          dask_gufunc_kwargs={"output_sizes": {out_dim: mol.hydrogens.size if out_dim == "bond"
                                                               else mol.oxygen.size}})


def oh_bonds(ds: xr.Dataset, molecules: Molecules | None = None, check_every: int = 0) -> xr.DataArray:
    """O-H bond lengths (frame, bond), Å, lazily. Bond 2m + j is H j of molecule m.

    With ``check_every`` > 0 the assignment is re-done on every n-th frame and a change
    (an H now nearer to another O) raises a warning naming the first frame where it happens.
    """
    mol = molecules or assign_molecules(ds)
    out = _apply(ds, _bonds_kernel, mol, "bond")
    if check_every > 0:
        species = np.array([str(s) for s in ds["species"].values])
        o_idx, h_idx = np.flatnonzero(species == "O"), np.flatnonzero(species == "H")
        owner = {int(h): int(o) for o, hs in zip(mol.oxygen, mol.hydrogens) for h in hs}
        box = orthorhombic_box(ds["cell"].values)
        for f in range(0, ds.sizes["frame"], check_every):
            nearest, _ = _nearest_o(np.asarray(ds["positions"].isel(frame=f).values), box, o_idx, h_idx)
            moved = [int(h) for h, n in zip(h_idx, nearest) if owner[int(h)] != int(o_idx[n])]
            if moved:
                warnings.warn(f"frame {f}: H atom {moved[0]} is now nearest to another O than in frame 0 "
                              f"({len(moved)} H changed): proton transfer or a broken bond", AssignmentWarning,
                              stacklevel=2)
                break
    out.attrs = {"units": "angstrom", "long_name": "O-H bond length", "merge": MERGE["oh_bond"]}
    return out.rename("oh_bond")


def hoh_angles(ds: xr.Dataset, molecules: Molecules | None = None) -> xr.DataArray:
    """H-O-H angles (frame, molecule), degrees, lazily."""
    mol = molecules or assign_molecules(ds)
    out = _apply(ds, _angles_kernel, mol, "molecule")
    out.attrs = {"units": "deg", "long_name": "H-O-H angle", "merge": MERGE["hoh_angle"]}
    return out.rename("hoh_angle")


def species_temperature(ds: xr.Dataset) -> xr.DataArray:
    """Kinetic temperature per species (frame, species), K: mean kinetic energy per atom / (3/2 k_B)."""
    ke = 0.5 * AMU_A2_PER_FS2_TO_EV * ds["masses"] * (ds["velocities"] ** 2).sum("xyz")
    labels = xr.DataArray(np.array([str(s) for s in ds["species"].values], dtype=object), dims="atom",
                          name="species")            # in memory: grouping needs known labels
    out = (ke.drop_vars("species", errors="ignore").groupby(labels).mean() / (1.5 * BOLTZMANN_EV_K)).transpose("frame", "species")
    out.attrs = {"units": "K", "long_name": "kinetic temperature per species", "merge": MERGE["species_temperature"]}
    return out.rename("species_temperature")


def merge(parts: list[xr.DataArray]) -> xr.DataArray:
    """Merge partial results of one analysis according to its declared rule."""
    rule = parts[0].attrs.get("merge")
    if rule != "concat(frame)":
        raise ValueError(f"no merge rule {rule!r}")
    out = xr.concat(parts, dim="frame")
    out.attrs = dict(parts[0].attrs)
    return out
