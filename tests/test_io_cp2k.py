"""CP2K ingestion against numbers read by hand from the raw files, and every failure mode."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose

from conftest import leftovers
from ensemble.bench import write_synthetic_cp2k_run
from ensemble.io import IngestError, ingest_cp2k, open_trajectory
from ensemble.io.cp2k import find_cp2k_files, index_xyz, read_cell_file

# CP2K 2023.1's own conversion factors (CODATA 2006), copied from the "Fundamental physical
# constants" block CP2K prints at PRINT_LEVEL MEDIUM, independently of ensemble.units
BOHR_A = 5.29177208590000e-01          # [a.u.] = [Bohr] -> [Angstrom]
AU_TIME_FS = 2.41888432650478e-02      # [a.u.] -> [fs]
HARTREE_EV = 2.72113838565563e+01      # [a.u.] -> [eV]
AMU_ME = 1.82288848426455e+03          # [u] -> [a.u.]
HARTREE_K = 3.15774647902944e+05       # [a.u.] -> [K]


def raw_atom_line(path: Path, frame: int, atom: int, natoms: int) -> tuple[str, np.ndarray]:
    """Species and numbers of one atom line, read with plain Python string handling."""
    lines = path.read_text().splitlines()
    parts = lines[frame * (natoms + 2) + 2 + atom].split()
    return parts[0], np.array([float(x) for x in parts[1:4]])


def test_dft_fixture_converted_values_match_raw_files_by_hand(dft_run, tmp_path):
    out = tmp_path / "dft.zarr"
    report = ingest_cp2k(dft_run, out)
    ds = open_trajectory(out).compute()
    assert ds.sizes == {"frame": 5, "atom": 96, "xyz": 3, "cell_vector": 3}
    assert ds["step"].values.tolist() == [1, 2, 3, 4, 5]
    assert_allclose(ds["time"].values, [0.5, 1.0, 1.5, 2.0, 2.5])
    assert ds.attrs["timestep_fs"] == 0.5
    # cell from the input's ABC
    assert_allclose(ds["cell"].values, np.diag([9.8528] * 3))
    assert "H2O-32-dft.inp" in ds.attrs["cell_source"]
    masses = {"O": 15.9994, "H": 1.00794}
    for frame, atom in [(0, 0), (2, 40), (4, 95)]:
        sp, xyz = raw_atom_line(dft_run / "H2O-32-pos-1.xyz", frame, atom, 96)
        assert str(ds["species"].values[atom]) == sp
        assert_allclose(ds["positions"].values[frame, atom], xyz, rtol=0, atol=0)
        _, v = raw_atom_line(dft_run / "H2O-32-vel-1.xyz", frame, atom, 96)
        assert_allclose(ds["velocities"].values[frame, atom], v * BOHR_A / AU_TIME_FS, rtol=1e-14)
        _, f = raw_atom_line(dft_run / "H2O-32-frc-1.xyz", frame, atom, 96)
        assert_allclose(ds["forces"].values[frame, atom], f * HARTREE_EV / BOHR_A, rtol=1e-14)
        # a = F / m in atomic units, then to Å/fs^2 with CP2K's factors; the package divides eV/Å by
        # amu with CODATA 2018 (amu, eV), which differs from CP2K's CODATA 2006 by ~8e-8
        a_au = f / (masses[sp] * AMU_ME)
        assert_allclose(ds["accelerations"].values[frame, atom], a_au * BOHR_A / AU_TIME_FS**2, rtol=2e-7)
    # first .ener line: 1  0.5  0.134540842  298.137452267  -550.114648941  -549.980108099
    assert_allclose(ds["potential_energy"].values[0], -550.114648941 * HARTREE_EV, rtol=1e-15)
    assert_allclose(ds["conserved_energy"].values[0], -549.980108099 * HARTREE_EV, rtol=1e-15)
    # kinetic energy computed in atomic units from the raw velocity file
    vel = np.array([[float(x) for x in ln.split()[1:4]] for ln in
                    (dft_run / "H2O-32-vel-1.xyz").read_text().splitlines()[2:98]])
    m = np.array([masses[str(s)] for s in ds["species"].values])
    ke_au = 0.5 * np.sum(m[:, None] * AMU_ME * vel**2)
    # velocities are printed to 1e-10 bohr/au_t (~3e-7 relative each); over 288 components the
    # kinetic energy carries ~2e-8 relative rounding, CP2K's .ener 9 decimals (7e-9)
    assert_allclose(ke_au, 0.134540842, rtol=5e-8)
    # our kinetic energy uses CODATA 2018 amu / eV; CP2K's factors are CODATA 2006 (8e-8 apart here)
    assert_allclose(ds["kinetic_energy"].values[0], ke_au * HARTREE_EV, rtol=2e-7)
    # CP2K's temperature column uses 3N - 3 degrees of freedom (285 for 96 atoms) ...
    assert_allclose(2 * ke_au / 285 * HARTREE_K, 298.137452267, rtol=5e-8)
    # ... and so do we. Our k_B (CODATA 2018) is 1.0e-6 relative below CP2K's (CODATA 2006); the
    # amu and eV changes between the two sets add ~1.7e-7 more, so compare at 3e-7
    assert_allclose(ds["temperature"].values[0], 298.137452267 * 1.3806504 / 1.380649, rtol=3e-7)
    assert abs(ds["temperature"].values[0] / 298.137452267 - 1) > 5e-7   # the k_B change is visible
    assert report.kinetic_energy_max_rel_error < 1e-7
    assert ds.attrs["kinetic_energy_check"]["max_rel_error"] < 2e-7   # CODATA 2006 vs 2018, print precision
    assert ds.attrs["acceleration_source"] == "forces / masses"
    for name in ds.variables:
        assert "units" in ds[name].attrs, name
    roles = {f["role"]: f for f in ds.attrs["source_files"]}
    assert roles["positions"]["size_bytes"] == (dft_run / "H2O-32-pos-1.xyz").stat().st_size
    assert len(roles["forces"]["sha256"]) == 64


def test_store_layout_is_frame_chunked_float64_zarr_v3(dft_run, tmp_path):
    import zarr

    ingest_cp2k(dft_run, tmp_path / "s.zarr", chunk_frames=2)
    g = zarr.open_group(tmp_path / "s.zarr", mode="r")
    assert g.metadata.zarr_format == 3
    assert g["positions"].chunks == (2, 96, 3)
    assert g["positions"].dtype == np.float64
    assert g["species"].metadata.data_type.to_json(zarr_format=3) == "string"
    ds = open_trajectory(tmp_path / "s.zarr")
    assert ds["positions"].data.chunks[0] == (2, 2, 1)


def test_prefix_and_pos_file_find_the_same_run(dft_run):
    a = find_cp2k_files(dft_run)
    b = find_cp2k_files(dft_run / "H2O-32")
    c = find_cp2k_files(dft_run / "H2O-32-pos-1.xyz")
    assert a == b == c
    assert a.forces.name == "H2O-32-frc-1.xyz" and a.energies.name == "H2O-32-1.ener"


def test_fist_run_takes_the_cell_from_the_cell_file(fist_run, tmp_path):
    ingest_cp2k(fist_run, tmp_path / "f.zarr")
    ds = open_trajectory(tmp_path / "f.zarr")
    cell = read_cell_file(fist_run / "production-1.cell")["cell"][0]
    assert_allclose(ds["cell"].values, cell)
    assert ds.attrs["cell_source"] == "production-1.cell"
    assert ds["step"].values.tolist() == list(range(8))
    assert ds.attrs["kinetic_energy_check"]["max_rel_error"] < 2e-7   # CODATA 2006 vs 2018, print precision


def test_velocity_differences_give_accelerations_without_forces(fist_run, tmp_path):
    full = tmp_path / "full.zarr"
    ingest_cp2k(fist_run, full)
    (fist_run / "production-frc-1.xyz").unlink()
    ingest_cp2k(fist_run, tmp_path / "nofrc.zarr")
    a = open_trajectory(full)
    b = open_trajectory(tmp_path / "nofrc.zarr")
    assert "forces" not in b
    assert "finite differences" in b.attrs["acceleration_source"]
    v = a["velocities"].values
    central = (v[2:] - v[:-2]) / (2 * 0.5)
    assert_allclose(b["accelerations"].values[1:-1], central, rtol=1e-12, atol=1e-15)
    # at 0.5 fs the difference quotient tracks F/m to a few per cent (relative RMS)
    err = b["accelerations"].values[1:-1] - a["accelerations"].values[1:-1]
    rel = np.sqrt((err**2).mean() / (a["accelerations"].values[1:-1] ** 2).mean())
    assert rel < 0.05


def test_blocked_reading_equals_one_block(fist_run, tmp_path):
    ingest_cp2k(fist_run, tmp_path / "a.zarr", chunk_frames=3, block_bytes=4096)
    ingest_cp2k(fist_run, tmp_path / "b.zarr")
    (fist_run / "production-frc-1.xyz").unlink()   # halo logic of velocity differences across chunks
    ingest_cp2k(fist_run, tmp_path / "c.zarr", chunk_frames=3)
    ingest_cp2k(fist_run, tmp_path / "d.zarr", chunk_frames=100)
    a, b = open_trajectory(tmp_path / "a.zarr"), open_trajectory(tmp_path / "b.zarr")
    for name in ("positions", "velocities", "forces", "accelerations", "temperature"):
        np.testing.assert_array_equal(a[name].values, b[name].values)
    c, d = open_trajectory(tmp_path / "c.zarr"), open_trajectory(tmp_path / "d.zarr")
    np.testing.assert_array_equal(c["accelerations"].values, d["accelerations"].values)


def test_different_strides_keep_the_intersection_and_say_so(fist_run, tmp_path):
    vel = fist_run / "production-vel-1.xyz"
    lines = vel.read_text().splitlines(keepends=True)
    frames = [lines[i * 50:(i + 1) * 50] for i in range(8)]
    vel.write_text("".join(sum(frames[::2], [])))          # steps 0, 2, 4, 6
    ingest_cp2k(fist_run, tmp_path / "s.zarr")
    ds = open_trajectory(tmp_path / "s.zarr")
    assert ds["step"].values.tolist() == [0, 2, 4, 6]
    assert ds.attrs["frame_interval_fs"] == 1.0 and ds.attrs["timestep_fs"] == 0.5
    assert "kept 4 of 8 frames" in ds.attrs["frame_selection"]


# ----------------------------------------------------------------------------- failures
def assert_ingest_fails(run: Path, tmp_path: Path, match: str, **kw):
    out = tmp_path / "bad.zarr"
    with pytest.raises(IngestError, match=match):
        ingest_cp2k(run, out, **kw)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_truncated_file_names_file_and_line(dft_run, tmp_path):
    p = dft_run / "H2O-32-pos-1.xyz"
    lines = p.read_text().splitlines(keepends=True)
    p.write_text("".join(lines[: 3 * 98 + 40]))             # frame 3 stops after 38 atoms
    assert_ingest_fails(dft_run, tmp_path, r"H2O-32-pos-1.xyz:\d+: file ends inside frame 3 .*expected 96 atom "
                                       r"lines, found 38")


def test_nan_names_file_line_and_atom(dft_run, tmp_path):
    p = dft_run / "H2O-32-frc-1.xyz"
    lines = p.read_text().splitlines(keepends=True)
    parts = lines[98 + 2 + 10].split()
    lines[98 + 2 + 10] = f"  {parts[0]}  NaN  {parts[2]}  {parts[3]}\n"
    p.write_text("".join(lines))
    assert_ingest_fails(dft_run, tmp_path, r"H2O-32-frc-1.xyz:111: frame 1 \(step 2\), atom 11 has a non-finite")


def test_garbage_number_is_reported(dft_run, tmp_path):
    p = dft_run / "H2O-32-vel-1.xyz"
    text = p.read_text().splitlines(keepends=True)
    text[4] = text[4].replace(".", "x", 1)
    p.write_text("".join(text))
    assert_ingest_fails(dft_run, tmp_path, r"H2O-32-vel-1.xyz:5: frame 0 \(step 1\), atom 3 has a field that is not a number")


def test_mismatched_atom_count(dft_run, tmp_path):
    p = dft_run / "H2O-32-vel-1.xyz"
    lines = p.read_text().splitlines(keepends=True)
    out = []
    for f in range(5):
        frame = lines[f * 98:(f + 1) * 98]
        out += ["      95\n", frame[1]] + frame[2:97]
    p.write_text("".join(out))
    assert_ingest_fails(dft_run, tmp_path, r"H2O-32-vel-1.xyz:1: 95 atoms, but H2O-32-pos-1.xyz has 96")


def test_species_order_mismatch(dft_run, tmp_path):
    p = dft_run / "H2O-32-frc-1.xyz"
    lines = p.read_text().splitlines(keepends=True)
    for f in range(5):
        i = f * 98 + 2
        lines[i] = lines[i].replace(" O ", " H ", 1)
    p.write_text("".join(lines))
    assert_ingest_fails(dft_run, tmp_path, r"H2O-32-frc-1.xyz:3: atom 1 is 'H' but 'O' in H2O-32-pos-1.xyz")


def test_species_change_inside_a_file(dft_run, tmp_path):
    p = dft_run / "H2O-32-pos-1.xyz"
    lines = p.read_text().splitlines(keepends=True)
    lines[2 * 98 + 2 + 50] = lines[2 * 98 + 2 + 50].replace(" H ", " O ", 1)
    p.write_text("".join(lines))
    assert_ingest_fails(dft_run, tmp_path, r"pos-1.xyz:249: frame 2 \(step 3\), atom 51 has a different species "
                                       r"than the first frame.*expected species 'H'")


def test_missing_velocity_file(dft_run, tmp_path):
    (dft_run / "H2O-32-vel-1.xyz").unlink()
    assert_ingest_fails(dft_run, tmp_path, r"H2O-32-vel-1.xyz: missing CP2K velocities file")


def test_missing_cell_asks_for_it(dft_run, tmp_path):
    (dft_run / "H2O-32-dft.inp").unlink()
    assert_ingest_fails(dft_run, tmp_path, r"no cell found .*--cell")
    ingest_cp2k(dft_run, tmp_path / "ok.zarr", cell=[9.8528] * 3)
    assert open_trajectory(tmp_path / "ok.zarr")["cell"].attrs["units"] == "angstrom"


def test_wrong_masses_fail_the_kinetic_energy_check(dft_run, tmp_path):
    assert_ingest_fails(dft_run, tmp_path, r"kinetic energy of step 1 .* differs from H2O-32-1.ener",
                    masses={"H": 2.014})


def test_restart_overlap_duplicate_steps(dft_run, tmp_path):
    p = dft_run / "H2O-32-pos-1.xyz"
    lines = p.read_text().splitlines(keepends=True)
    p.write_text("".join(lines + lines[3 * 98:4 * 98]))       # step 4 again after step 5
    assert_ingest_fails(dft_run, tmp_path, r"pos-1.xyz:492: step i = 4 \(frame 5\) does not follow step 5")


def test_time_mismatch_between_files(dft_run, tmp_path):
    p = dft_run / "H2O-32-1.ener"
    lines = p.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace("1.000000", "1.250000")
    p.write_text("".join(lines))
    assert_ingest_fails(dft_run, tmp_path, r"H2O-32-1.ener: step 2 is at 1.25 fs but at 1.0 fs")


def test_existing_output_is_kept_on_failure_and_needs_overwrite(dft_run, tmp_path):
    out = tmp_path / "s.zarr"
    ingest_cp2k(dft_run, out)
    before = open_trajectory(out)["positions"].values.copy()
    with pytest.raises(IngestError, match="already exists"):
        ingest_cp2k(dft_run, out)
    (dft_run / "H2O-32-vel-1.xyz").write_text("garbage\n")
    with pytest.raises(IngestError):
        ingest_cp2k(dft_run, out, overwrite=True)
    np.testing.assert_array_equal(open_trajectory(out)["positions"].values, before)
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- streaming
def test_streaming_ingest_of_a_file_larger_than_the_memory_budget(tmp_path):
    info = write_synthetic_cp2k_run(tmp_path / "big", n_molecules=32, n_frames=5000, seed=3)
    pos_bytes = (tmp_path / "big" / "synthetic-pos-1.xyz").stat().st_size
    budget = 8 * 2**20
    assert pos_bytes > 3 * budget                      # each of the three files alone exceeds the budget
    ingest_cp2k(tmp_path / "big", tmp_path / "warm.zarr", chunk_frames=50)   # compile kernels outside
    tracemalloc.start()
    report = ingest_cp2k(tmp_path / "big", tmp_path / "big.zarr", chunk_frames=100, block_bytes=2**20)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < budget, f"peak traced allocation {peak / 2**20:.1f} MiB"
    assert report.frames == 5000
    ds = open_trajectory(tmp_path / "big.zarr")
    assert_allclose(ds["positions"].values[0], info["first"]["pos"], rtol=0, atol=1e-12)
    assert_allclose(ds["positions"].values[-1], info["last"]["pos"], rtol=0, atol=1e-12)
    assert_allclose(ds["forces"].values[-1], info["last"]["frc"] * HARTREE_EV / BOHR_A, rtol=1e-12)


def test_index_records_every_frame_offset(fist_run):
    ix = index_xyz(fist_run / "production-pos-1.xyz", block_bytes=1000)
    assert ix.n_frames == 8
    raw = (fist_run / "production-pos-1.xyz").read_bytes()
    for f in range(8):
        assert raw[ix.offsets[f]:].split(b"\n")[1].strip().startswith(f"i = {f:8d}".encode()[:4])
        assert int(raw[ix.offsets[f]:].split(b"\n")[1].split(b"=")[1].split(b",")[0]) == f
    assert ix.offsets[-1] == len(raw)
