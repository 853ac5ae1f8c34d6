from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from conftest import leftovers
from ensemble.io import IngestError, ingest_cp2k, open_trajectory
from ensemble.io.ase import ingest_ase, write_extxyz


def test_extxyz_round_trip(dft_run, tmp_path):
    ingest_cp2k(dft_run, tmp_path / "a.zarr")
    write_extxyz(tmp_path / "a.zarr", tmp_path / "a.extxyz")
    ingest_ase(tmp_path / "a.extxyz", tmp_path / "b.zarr", chunk_frames=2)
    a, b = open_trajectory(tmp_path / "a.zarr"), open_trajectory(tmp_path / "b.zarr")
    # extxyz stores 8 decimals (positions Å, momenta amu Å / ASE time, forces eV/Å)
    assert_allclose(b["positions"].values, a["positions"].values, rtol=0, atol=6e-9)
    assert_allclose(b["velocities"].values, a["velocities"].values, rtol=0, atol=1e-9)
    assert_allclose(b["forces"].values, a["forces"].values, rtol=0, atol=6e-9)
    assert_allclose(b["accelerations"].values, a["accelerations"].values, rtol=0, atol=1e-9)
    assert_allclose(b["potential_energy"].values, a["potential_energy"].values, rtol=1e-12)
    assert_allclose(b["temperature"].values, a["temperature"].values, rtol=1e-6)
    for name in ("masses", "cell", "time", "step"):
        np.testing.assert_array_equal(b[name].values, a[name].values)
    assert [str(s) for s in b["species"].values] == [str(s) for s in a["species"].values]
    assert b.attrs["timestep_fs"] == 0.5 and b["positions"].data.chunks[0] == (2, 2, 1)
    for name in b.variables:
        assert "units" in b[name].attrs


def test_ase_without_time_needs_dt(tmp_path, dft_run):
    import ase.io

    ingest_cp2k(dft_run, tmp_path / "a.zarr")
    write_extxyz(tmp_path / "a.zarr", tmp_path / "a.extxyz")
    frames = ase.io.read(tmp_path / "a.extxyz", index=":")
    for f in frames:
        del f.info["time"]
    ase.io.write(tmp_path / "notime.extxyz", frames)
    with pytest.raises(IngestError, match="pass --dt-fs"):
        ingest_ase(tmp_path / "notime.extxyz", tmp_path / "c.zarr")
    assert not (tmp_path / "c.zarr").exists() and leftovers(tmp_path) == []
    ingest_ase(tmp_path / "notime.extxyz", tmp_path / "c.zarr", dt_fs=0.5)
    assert_allclose(open_trajectory(tmp_path / "c.zarr")["time"].values, [0, 0.5, 1.0, 1.5, 2.0])


def test_ase_velocities_unit():
    from ase import units

    from ensemble.units import ASE_VELOCITY_TO_ANGSTROM_PER_FS
    # 1 Å/fs expressed in ASE's velocity unit, converted back
    assert_allclose((1.0 / units.fs) * ASE_VELOCITY_TO_ANGSTROM_PER_FS, 1.0, rtol=1e-6)
