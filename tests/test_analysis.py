"""Analyses: exact geometry of hand-built molecules (also across the boundary), dask parity,
merging halves, assignment checks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr
from numpy.testing import assert_allclose

from ensemble.analysis import (AssignmentWarning, assign_molecules, hoh_angles, merge, oh_bonds,
                               species_temperature)
from ensemble.data import load_default


def water_dataset(positions, box=10.0, frames=1):
    pos = np.asarray(positions, float)
    pos = np.broadcast_to(pos, (frames,) + pos.shape).copy()
    n = pos.shape[1]
    species = np.array(["O", "H", "H"] * (n // 3), dtype=object)
    return xr.Dataset({"positions": (("frame", "atom", "xyz"), pos),
                       "velocities": (("frame", "atom", "xyz"), np.zeros_like(pos)),
                       "masses": (("atom",), np.where(species == "O", 15.9994, 1.00794)),
                       "cell": (("cell_vector", "xyz"), np.eye(3) * box)},
                      coords={"species": ("atom", species)})


def molecule(o, r1, r2, angle_deg, box=10.0):
    half = np.radians(angle_deg) / 2
    h1 = o + r1 * np.array([np.cos(half), np.sin(half), 0.0])
    h2 = o + r2 * np.array([np.cos(half), -np.sin(half), 0.0])
    return [o, h1 % box, h2 % box]


def test_hand_built_molecules_give_exact_bonds_and_angles_across_the_boundary():
    box = 10.0
    # molecule 1 in the middle; molecule 2 straddles the x and y faces (its H wrap around)
    atoms = molecule(np.array([5.0, 5.0, 5.0]), 0.97, 1.01, 104.5) + molecule(np.array([9.7, 0.2, 3.0]), 1.05, 0.93, 110.0)
    ds = water_dataset(atoms, box)
    bonds = oh_bonds(ds)
    assert bonds.attrs["units"] == "angstrom"
    assert_allclose(bonds.values[0], [0.97, 1.01, 1.05, 0.93], rtol=1e-12)
    assert_allclose(hoh_angles(ds).values[0], [104.5, 110.0], rtol=1e-12)
    mol = assign_molecules(ds)
    assert mol.oxygen.tolist() == [0, 3] and mol.hydrogens.tolist() == [[1, 2], [4, 5]]


def test_dask_equals_numpy_and_halves_merge_to_the_whole():
    ds = load_default().isel(frame=slice(0, 60))
    whole = oh_bonds(ds).values
    lazy = oh_bonds(ds.chunk({"frame": 13}))
    assert lazy.chunks is not None
    np.testing.assert_array_equal(lazy.values, whole)
    halves = merge([oh_bonds(ds.isel(frame=slice(0, 25))), oh_bonds(ds.isel(frame=slice(25, 60)))])
    np.testing.assert_array_equal(halves.values, whole)
    ang = hoh_angles(ds.chunk({"frame": 13}))
    assert 100 < float(ang.mean()) < 115 and ang.attrs["units"] == "deg"
    assert 0.95 < float(oh_bonds(ds).mean()) < 1.08          # SPC/Fw liquid: ~1.03 Å
    t = species_temperature(ds.chunk({"frame": 20}))
    assert t.dims == ("frame", "species") and t.attrs["units"] == "K"
    np.testing.assert_allclose(merge([species_temperature(ds.isel(frame=slice(0, 30))),
                                      species_temperature(ds.isel(frame=slice(30, 60)))]).values,
                               species_temperature(ds).values, rtol=1e-12)


def test_broken_or_ambiguous_assignment_is_reported():
    with pytest.raises(ValueError, match="has 3 nearest H"):
        # the second molecule's first H sits next to the first O
        atoms = molecule(np.array([2.0, 2.0, 2.0]), 1.0, 1.0, 104.5) + molecule(np.array([7.0, 7.0, 7.0]), 1.0, 1.0, 104.5)
        atoms[4] = np.array([2.0, 2.0, 3.0])
        assign_molecules(water_dataset(atoms))
    atoms = molecule(np.array([2.0, 2.0, 2.0]), 1.0, 1.0, 104.5) + molecule(np.array([4.2, 2.0, 2.0]), 1.0, 1.0, 104.5)
    atoms[1] = np.array([3.05, 2.3, 2.0])        # halfway between the two O
    with pytest.warns(AssignmentWarning, match="ambiguous"):
        assign_molecules(water_dataset(atoms), ambiguity_ratio=0.8)
    # a proton that moves to the other O during the run
    a = molecule(np.array([2.0, 2.0, 2.0]), 1.0, 1.0, 104.5) + molecule(np.array([6.0, 2.0, 2.0]), 1.0, 1.0, 104.5)
    ds = water_dataset(a, frames=4)
    ds["positions"][2:, 1] = np.array([5.1, 2.0, 2.0])
    with pytest.warns(AssignmentWarning, match="frame 2: H atom 1 is now nearest to another O"):
        oh_bonds(ds, check_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        oh_bonds(ds.isel(frame=slice(0, 2)), check_every=1)
