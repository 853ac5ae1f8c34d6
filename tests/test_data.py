"""The embedded default data set: real CP2K SPC/Fw water, unpacked into the schema."""

from __future__ import annotations

import numpy as np
from numpy.testing import assert_allclose

from ensemble.data import DEFAULT_DATA, QUANTA, load_default, pack_store, write_default_store
from ensemble.io import ingest_cp2k, open_trajectory


def test_embedded_data_is_small_and_physical():
    assert DEFAULT_DATA.stat().st_size < 5e6
    ds = load_default()
    assert ds.sizes["atom"] == 384 and ds.sizes["frame"] >= 1000
    assert [str(s) for s in ds["species"].values[:3]] == ["O", "H", "H"]
    assert ds.attrs["timestep_fs"] == 0.5 and ds.attrs["frame_interval_fs"] == 0.5
    assert_allclose(ds["cell"].values, np.eye(3) * 15.6404)
    assert ds.attrs["kinetic_energy_check"]["max_rel_error"] < 1e-4
    assert ds.attrs["reference_run"]["equilibration_steps"] >= 20000
    assert "CP2K version" in ds.attrs["reference_run"]["cp2k"]
    # room-temperature liquid water: 128 O and 256 H, each H 0.9-1.2 Å from its own O
    assert 270 < float(ds["temperature"].mean()) < 340
    pos = ds["positions"].values[::100]
    o, h = pos[:, 0::3], pos[:, 1::3]
    for hh in (pos[:, 1::3], pos[:, 2::3]):
        d = hh - o
        d -= 15.6404 * np.round(d / 15.6404)
        r = np.linalg.norm(d, axis=-1)
        assert 0.85 < r.min() and r.max() < 1.25
    assert h.shape[1] == 128
    # equipartition: per-atom kinetic temperatures of O and H agree (per-atom CSVR equilibration)
    from ensemble.units import AMU_A2_PER_FS2_TO_EV, BOLTZMANN_EV_K
    ke = 0.5 * AMU_A2_PER_FS2_TO_EV * ds["masses"] * (ds["velocities"] ** 2).sum("xyz")
    t = ke.groupby("species").mean().mean("frame") / (1.5 * BOLTZMANN_EV_K)
    assert abs(float(t.sel(species="O")) - float(t.sel(species="H"))) < 30
    # NVE: CP2K's conserved energy stays flat while the kinetic energy fluctuates
    e, k = ds["conserved_energy"].values, ds["kinetic_energy"].values
    assert e.std() < 0.02 * k.std()
    # accelerations are forces / masses
    assert_allclose(ds["accelerations"].values[5] * ds["masses"].values[:, None] * 103.6427,
                    ds["forces"].values[5], rtol=1e-5, atol=1e-9)


def test_pack_unpack_round_trip_within_quanta(fist_run, tmp_path):
    ingest_cp2k(fist_run, tmp_path / "s.zarr")
    pack_store(tmp_path / "s.zarr", tmp_path / "s.zip")
    a = open_trajectory(tmp_path / "s.zarr")
    b = load_default(tmp_path / "s.zip")
    for name, q in QUANTA.items():
        err = np.abs(a[name].values - b[name].values)
        assert err.max() <= 0.5 * q * (1 + 1e-9)
    for name in ("potential_energy", "conserved_energy", "time", "step", "masses", "cell"):
        np.testing.assert_array_equal(b[name].values, a[name].values)


def test_write_default_store_is_a_regular_store(tmp_path):
    attrs = write_default_store(tmp_path / "ref.zarr")
    ds = open_trajectory(tmp_path / "ref.zarr")
    assert ds["positions"].data.chunks[0][0] == 455          # 4 MiB chunks of 384 atoms
    assert attrs["kinetic_energy_check"]["max_rel_error"] < 1e-4
    assert_allclose(ds["positions"].values, load_default()["positions"].values)
