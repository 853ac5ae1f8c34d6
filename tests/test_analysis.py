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


# ---------------------------------------------------------------- spectra, rdf, analyze, stability

from ensemble.analysis import (SPEED_OF_LIGHT_CM_PER_FS, AnalysisError, analyze, block_average, oh_spectrum,
                               open_stats, rdf, spectral_peak, time_to_failure, vdos, write_stats)


def timed(ds, dt_fs=0.5, first_step=0):
    n = ds.sizes["frame"]
    return ds.assign_coords(step=("frame", first_step + np.arange(n)), time=("frame", dt_fs * (first_step + np.arange(n))))


def oscillating_water(wavenumber, frames=800, dt_fs=0.5, amplitude=0.02):
    """Two molecules; H 1 stretches as 1 + a sin(2 pi c k t); its velocity is the exact derivative."""
    atoms = np.array(molecule(np.array([3.0, 3.0, 3.0]), 1.0, 1.0, 104.5) +
                     molecule(np.array([7.0, 7.0, 7.0]), 1.0, 1.0, 104.5))
    ds = timed(water_dataset(atoms, frames=frames), dt_fs)
    omega = 2 * np.pi * wavenumber * SPEED_OF_LIGHT_CM_PER_FS            # rad/fs
    t = dt_fs * np.arange(frames)
    u = (atoms[1] - atoms[0]) / np.linalg.norm(atoms[1] - atoms[0])
    pos, vel = ds["positions"].values.copy(), ds["velocities"].values.copy()
    pos[:, 1] = atoms[0] + np.outer(1.0 + amplitude * np.sin(omega * t), u)
    vel[:, 1] = np.outer(amplitude * omega * np.cos(omega * t), u)
    return ds.assign(positions=(("frame", "atom", "xyz"), pos), velocities=(("frame", "atom", "xyz"), vel))


def test_a_bond_oscillating_at_a_known_frequency_peaks_in_the_right_bin():
    k0 = 3400.0
    ds = oscillating_water(k0)
    spec = oh_spectrum(oh_bonds(ds), ds, window_frames=200)
    assert spec.attrs["units"] == "angstrom^2 cm" and spec.sizes["window"] == 4
    grid = spec["wavenumber"].values
    mean = spec.mean("window")
    assert int(mean.argmax("wavenumber")) == int(np.argmin(np.abs(grid - k0)))    # the bin holding k0
    assert_allclose(spectral_peak(spec).values, k0, atol=5.0)                      # refined within 5 cm^-1
    assert np.isnan(float(spectral_peak(mean, band=(3500.0, 4500.0))))        # only a slope in that band
    # Parseval: the integral is the bond variance averaged over the 4 bonds (a^2 / 2 for one of them)
    assert_allclose(float(mean.integrate("wavenumber")), 0.02 ** 2 / 2 / 4, rtol=0.02)
    d = vdos(ds, window_frames=200)
    assert_allclose(d.sel(species="H").integrate("wavenumber").values, 3.0, rtol=1e-9)   # per atom
    assert np.isnan(d.sel(species="O").values).all()          # O never moves: no spectrum to normalize
    assert_allclose(spectral_peak(d.sel(species="H").mean("window")).values, k0, atol=5.0)


def test_windows_follow_absolute_steps_and_unresolved_sampling_is_refused():
    ds = oscillating_water(3000.0, frames=500)
    late = timed(ds.isel(frame=slice(130, None)), first_step=130)
    spec = oh_spectrum(oh_bonds(late), late, window_frames=100)
    assert spec["window"].values.tolist() == [200, 300, 400]      # starts aligned to multiples of 100
    coarse = timed(ds.isel(frame=slice(0, None, 20)), dt_fs=10.0)
    with pytest.raises(AnalysisError, match="resolve wavenumbers only up to 1668 cm"):
        oh_spectrum(oh_bonds(coarse), coarse, window_frames=20)
    stats = analyze(coarse)
    assert stats.attrs["spectra"].startswith("not computed: frames every 10 fs") and "oh_spectrum" not in stats


def test_rdf_of_uniform_random_points_is_one_within_poisson_noise():
    rng = np.random.default_rng(7)
    box, n, frames = 12.0, 300, 20
    pos = rng.uniform(0, box, (frames, n, 3))
    species = np.array(["O"] * 100 + ["H"] * 200, dtype=object)
    ds = xr.Dataset({"positions": (("frame", "atom", "xyz"), pos), "cell": (("cell_vector", "xyz"), np.eye(3) * box)},
                    coords={"species": ("atom", species)})
    g = rdf(ds.chunk({"frame": 7}), r_max=6.0, bin_width=0.1)
    assert g.dims == ("frame", "pair", "r") and g["pair"].values.tolist() == ["O-O", "O-H", "H-H"]
    mean = g.mean("frame").values.astype(float)
    r = g["r"].values
    shell = 4 / 3 * np.pi * ((r + 0.05) ** 3 - (r - 0.05) ** 3)
    ideal = np.array([100 * 99 / 2, 100 * 200, 200 * 199 / 2])[:, None] * shell / box ** 3 * frames
    z = (mean - 1.0) * np.sqrt(ideal)                  # Poisson: sigma(g) = 1 / sqrt(ideal counts)
    sel = r > 1.0
    assert 0.7 < float((z[:, sel] ** 2).mean()) < 1.3
    assert abs(float(mean[:, sel].mean()) - 1.0) < 0.01
    with pytest.raises(AnalysisError, match="exceeds half the shortest box edge"):
        rdf(ds, r_max=6.5)


def test_rdf_counts_a_pair_across_the_boundary_in_its_bin():
    ds = water_dataset([[0.2, 5.0, 5.0], [9.77, 5.0, 5.0], [5.03, 5.0, 5.0]])  # O; H 0.43 Å away through x = 0
    g = rdf(ds, r_max=5.0, bin_width=0.1)
    oh = g.sel(pair="O-H").isel(frame=0)
    nonzero = oh["r"].values[oh.values > 0]
    assert_allclose(nonzero, [0.45, 4.85], atol=1e-9)     # 0.43 Å (bin 0.4-0.5) and 4.83 Å (bin 4.8-4.9)
    assert np.isnan(g.sel(pair="O-O").values).all()       # one O: no O-O pairs, g undefined


def test_analyze_lazy_equals_in_memory_and_window_aligned_halves_merge_to_the_whole(tmp_path):
    ds = load_default().isel(frame=slice(0, 400))
    whole = analyze(ds, window_fs=50.0).compute()
    lazy = analyze(ds.chunk({"frame": 64}), window_fs=50.0)
    assert lazy["rdf"].chunks is not None
    xr.testing.assert_allclose(lazy.compute(), whole, rtol=1e-12, atol=0)
    halves = merge([analyze(ds.isel(frame=slice(0, 200)), window_fs=50.0),
                    analyze(ds.isel(frame=slice(200, 400)), window_fs=50.0)]).compute()
    xr.testing.assert_allclose(halves, whole, rtol=1e-12, atol=0)
    assert whole["oh_spectrum"].sizes["window"] == 4
    assert int(whole["oh_bond_hist"].sum()) == 400 * 256 and whole["oh_bond_hist"].attrs["merge"] == "sum"
    top = float(whole["oh_bond_hist"]["oh_bond_bin"][int(whole["oh_bond_hist"].argmax("oh_bond_bin"))])
    assert 1.00 < top < 1.06 and int(whole["hoh_angle_hist"].sum()) == 400 * 128
    assert 3400 < float(whole["oh_spectrum_peak"].mean()) < 3800        # SPC/Fw O-H stretch
    assert 2.6 < float(whole["rdf"]["r"][whole["rdf"].sel(pair="O-O").mean("frame").argmax("r")]) < 2.9
    path = write_stats(lazy, tmp_path / "stats.zarr")
    back = open_stats(path)
    xr.testing.assert_allclose(back, whole, rtol=1e-12, atol=0)
    assert back["oh_bond"].attrs["units"] == "angstrom" and back["vdos"].attrs["merge"] == "concat(window)"
    assert all("units" in back[v].attrs for v in back.data_vars)


def test_block_average_accounts_for_correlation():
    rng = np.random.default_rng(3)
    white = rng.normal(size=4000)
    mean, sem = block_average(white, n_blocks=10)
    assert abs(mean) < 4 * sem and 0.5 < sem / (1 / np.sqrt(4000)) < 1.6
    slow = np.repeat(rng.normal(size=40), 100)          # correlated over 100 samples
    _, sem_slow = block_average(slow, n_blocks=10)
    assert sem_slow > 5 / np.sqrt(4000)                 # far above the naive white-noise error
    assert np.isnan(block_average([1.0])[1])


def test_time_to_failure_by_bond_and_by_rdf_area():
    ds = load_default().isel(frame=slice(0, 200))
    ref = analyze(ds).compute()
    ok = time_to_failure(ref, ref)
    assert not ok["failed"] and ok["rdf_area_max_per_window"][0] < 1e-6
    broken = ref.copy(deep=True)
    broken["oh_bond"][120:, 7] = 2.3
    res = time_to_failure(broken)
    assert res["failed"] and res["time_fs"] == pytest.approx(60.0) and "bond 7" in res["criterion"]
    gas = ref.copy(deep=True)
    gas["rdf"][:] = 1.0                                   # a structureless fluid: area far above 3
    res = time_to_failure(gas, ref)
    assert res["failed"] and res["time_fs"] == 0.0 and "O-H" in res["criterion"]
