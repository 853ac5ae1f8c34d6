"""Analyses: per-frame topology of reactive water (ions, free protons, proton hops with a dwell
time), exact geometry of hand-built molecules (also across the boundary), the three stability
criteria each tripped alone, dask parity, and pieces that merge to the whole."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from numpy.testing import assert_allclose

from ensemble.analysis import (SPEED_OF_LIGHT_CM_PER_FS, AnalysisError, analyze, angle_from_distances,
                               block_average, committed_owners, ion_lifetimes, merge, oh_spectrum, open_stats,
                               proton_transfers, rdf, run_scalars, select_frames, species_temperature,
                               spectral_peak, split_frame_range, stability, topology, vdos, write_stats)
from ensemble.data import load_default

SPECIES = {"O": 15.9994, "H": 1.00794}


def dataset(positions, species, box=10.0, dt_fs=0.5, velocities=None):
    """A trajectory Dataset from positions (frames, atoms, 3) or (atoms, 3)."""
    pos = np.asarray(positions, float)
    if pos.ndim == 2:
        pos = pos[None]
    species = np.array(species, dtype=object)
    n = pos.shape[0]
    vel = np.zeros_like(pos) if velocities is None else np.asarray(velocities, float)
    return xr.Dataset({"positions": (("frame", "atom", "xyz"), pos),
                       "velocities": (("frame", "atom", "xyz"), vel),
                       "masses": (("atom",), np.array([SPECIES[s] for s in species])),
                       "cell": (("cell_vector", "xyz"), np.eye(3) * box)},
                      coords={"species": ("atom", species), "step": ("frame", np.arange(n)),
                              "time": ("frame", dt_fs * np.arange(n))})


def molecule(o, r1, r2, angle_deg, box=10.0):
    half = np.radians(angle_deg) / 2
    h1 = o + r1 * np.array([np.cos(half), np.sin(half), 0.0])
    h2 = o + r2 * np.array([np.cos(half), -np.sin(half), 0.0])
    return [o, h1 % box, h2 % box]


def water_box(molecules, box=10.0, frames=1):
    atoms = [a for m in molecules for a in m]
    pos = np.broadcast_to(np.asarray(atoms, float), (frames, len(atoms), 3)).copy()
    return dataset(pos, ["O", "H", "H"] * len(molecules), box)


# ---------------------------------------------------------------- topology and geometry


def test_hand_built_molecules_give_exact_bonds_and_angles_across_the_boundary():
    box = 10.0
    # molecule 1 in the middle; molecule 2 straddles the x and y faces (its H wrap around)
    ds = water_box([molecule(np.array([5.0, 5.0, 5.0]), 0.97, 1.01, 104.5, box),
                    molecule(np.array([9.7, 0.2, 3.0]), 1.05, 0.93, 110.0, box)], box)
    top = topology(ds).compute()
    assert top["oh_bond"].attrs["units"] == "angstrom" and top["hoh_angle"].attrs["units"] == "deg"
    assert_allclose(top["oh_bond"].values[0], [0.97, 1.01, 1.05, 0.93], rtol=1e-12)
    assert_allclose(top["hoh_angle"].values[0], [104.5, 110.0], rtol=1e-12)
    assert top["h_owner"].values[0].tolist() == [0, 0, 3, 3]          # atom indices of their oxygens
    assert int(top["n_water"][0]) == 2 and int(top["n_hydronium"][0]) == 0
    # the intramolecular H-H distance implies the same angle (law of cosines, then the isosceles formula)
    hh = top["hh_intra"].values[0, 0]
    assert_allclose(hh, np.sqrt(0.97**2 + 1.01**2 - 2 * 0.97 * 1.01 * np.cos(np.radians(104.5))), rtol=1e-12)
    assert_allclose(angle_from_distances(2 * np.sin(np.radians(52.25)), 1.0), 104.5, rtol=1e-12)


def hydronium(o, r, half_angle_deg):
    """H3O+: three H at distance r on a cone of half angle beta around +z (C3v)."""
    b = np.radians(half_angle_deg)
    return [o] + [o + r * np.array([np.sin(b) * np.cos(p), np.sin(b) * np.sin(p), np.cos(b)])
                  for p in np.radians([0.0, 120.0, 240.0])]


def test_a_box_with_one_hydronium_and_one_hydroxide_is_counted_exactly():
    box = 12.0
    beta = 70.0
    h3o = hydronium(np.array([2.0, 2.0, 2.0]), 0.98, beta)
    oh = [np.array([8.0, 8.0, 8.0]), np.array([8.0, 8.0, 8.97])]
    w1 = molecule(np.array([2.0, 8.0, 5.0]), 0.96, 0.96, 104.5, box)
    w2 = molecule(np.array([8.0, 3.0, 5.0]), 1.00, 0.95, 101.0, box)
    atoms = h3o + oh + w1 + w2
    species = ["O", "H", "H", "H", "O", "H"] + ["O", "H", "H"] * 2
    ds = dataset(np.array(atoms)[None], species, box)
    top = topology(ds).compute()
    assert [int(top[k][0]) for k in ("n_water", "n_hydronium", "n_hydroxide", "n_other_oxygen",
                                     "n_free_hydrogen", "max_h_per_oxygen")] == [2, 1, 1, 0, 0, 3]
    assert top["o_hydrogens"].values[0].tolist() == [3, 1, 2, 2]
    assert_allclose(top["oh_bond"].values[0], [0.98, 0.98, 0.98, 0.97, 0.96, 0.96, 1.00, 0.95], rtol=1e-12)
    # water angles exact; the ions have none (NaN), the hydronium angle is its own variable
    assert_allclose(top["hoh_angle"].values[0, 2:], [104.5, 101.0], rtol=1e-12)
    assert np.isnan(top["hoh_angle"].values[0, :2]).all()
    cos = np.cos(np.radians(beta)) ** 2 + np.sin(np.radians(beta)) ** 2 * np.cos(np.radians(120.0))
    assert_allclose(top["h3o_angle"].values[0, 0], np.degrees(np.arccos(cos)), rtol=1e-12)
    assert np.isnan(top["h3o_angle"].values[0, 1:]).all()
    # analyze accepts ions at frame 0 (no intact-water requirement) and weights angles by the waters present
    st = analyze(dataset(np.repeat(np.array(atoms)[None], 40, axis=0), species, box)).compute()
    assert_allclose(st["hoh_angle_mean"].values, (104.5 + 101.0) / 2, rtol=1e-12)
    assert int(st["hoh_angle_hist"].sum()) == 80 and int(st["oh_bond_hist"].sum()) == 320
    rows = run_scalars(st)
    assert rows["n_hydronium"].value[0] == 1.0 and rows["n_hydroxide"].value[0] == 1.0
    assert_allclose(rows["h3o_angle_mean"].value[0], np.degrees(np.arccos(cos)), rtol=1e-12)
    assert proton_transfers(st).count == 0
    with pytest.raises(AnalysisError, match=r"needs O and H atoms.*\['H'\]"):
        topology(dataset(np.zeros((1, 2, 3)) + [[0, 0, 0], [1, 0, 0]], ["H", "H"]))


def two_waters_with_a_moving_proton(path_o1_to_o2, frames_before=40, frames_after=80, oo=2.5):
    """Two waters whose O are ``oo`` Å apart on x; H 1 sits on the O-O line, 1 Å from O 0, moves
    along ``path`` (fractions of the way to 1 Å from O 3), then stays at the path's end."""
    o1, o2 = np.array([3.0, 5.0, 5.0]), np.array([3.0 + oo, 5.0, 5.0])
    start, end = o1 + [1.0, 0, 0], o2 - [1.0, 0, 0]
    fractions = np.concatenate([np.zeros(frames_before), path_o1_to_o2, np.full(frames_after, path_o1_to_o2[-1])])
    atoms = np.array([o1, start, o1 + [-0.3, 0.95, 0.0], o2, o2 + [0.3, 0.95, 0.0], o2 + [0.3, -0.95, 0.0]])
    pos = np.repeat(atoms[None], fractions.size, axis=0)
    pos[:, 1] = start + fractions[:, None] * (end - start)
    return dataset(pos, ["O", "H", "H", "O", "H", "H"], box=12.0)


def test_a_proton_hop_is_one_event_with_continuous_bonds_and_no_failure():
    # H moved smoothly from one O to the other over 20 fs (40 frames of 0.5 fs), then kept there
    ds = two_waters_with_a_moving_proton(0.5 - 0.5 * np.cos(np.linspace(0, np.pi, 40)))
    st = analyze(ds.chunk({"frame": 32}), window_fs=20.0).compute()
    assert float(st["oh_bond"].max()) < 1.3                       # distance to the nearest O: continuous
    assert 1.23 < float(st["oh_bond"].sel(hydrogen=1).max()) <= 1.25 + 1e-12     # near the midpoint of 2.5 Å
    pt = proton_transfers(st, dwell_fs=20.0)
    assert pt.count == 1 and pt.events[0][1:] == (1, 0, 3)      # H 1 from O 0 to O 3
    assert 20.0 < pt.events[0][0] < 40.0                          # during the move (frames 40..80)
    assert_allclose(pt.rate_per_molecule_ps, 1 / (2 * 160 * 0.5e-3), rtol=1e-12)
    assert int(st["n_hydroxide"][-1]) == 1 and int(st["n_hydronium"][-1]) == 1 and int(st["n_water"][0]) == 2
    res = stability(st, st)
    assert not res["failed"], res
    life = ion_lifetimes(st)
    assert life["hydronium"]["censored"] == 1 and life["hydronium"]["complete"] == 0   # still there at the end


def test_rattling_shorter_than_the_dwell_time_is_no_event():
    # the proton crosses the midpoint for 10 fs (20 frames) and comes back
    there = np.concatenate([np.linspace(0, 0.7, 10), np.full(20, 0.7), np.linspace(0.7, 0, 10)])
    st = analyze(two_waters_with_a_moving_proton(there), window_fs=20.0).compute()
    assert (st["h_owner"].sel(hydrogen=1).values == 3).sum() > 0           # it was nearer the other O...
    assert proton_transfers(st, dwell_fs=20.0).count == 0                   # ...but not for 20 fs
    assert proton_transfers(st, dwell_fs=5.0).count == 2                    # a shorter dwell: there and back
    owners = np.array([[0, 0, 3, 3, 3, 0, 0, 3, 3]]).T
    committed, events = committed_owners(owners, dwell_frames=3)
    assert events == [(2, 0, 0, 3)] and committed[:, 0].tolist() == [0, 0, 3, 3, 3, 3, 3, 3, 3]


# ---------------------------------------------------------------- stability: each criterion alone


@pytest.fixture(scope="module")
def water200():
    return load_default().isel(frame=slice(0, 200))


@pytest.fixture(scope="module")
def ref_stats(water200):
    return analyze(water200).compute()


def fired(res):
    return {name for name, c in res["criteria"].items() if c["failed"]}


def test_each_stability_criterion_fires_on_its_own_trajectory_and_only_there(water200, ref_stats):
    assert fired(stability(ref_stats, ref_stats)) == set()
    # blow-up: non-finite positions from frame 150 on (75 fs)
    pos = water200["positions"].values.copy()
    pos[150:, 10] = np.nan
    res = stability(analyze(water200.assign(positions=(("frame", "atom", "xyz"), pos))).compute(), ref_stats)
    assert fired(res) == {"blow_up"} and res["time_fs"] == pytest.approx(75.0) and "non-finite" in res["cause"]
    # blow-up: runaway temperature
    hot = ref_stats.copy(deep=True)
    hot["temperature"][120:] = 2500.0
    res = stability(hot, ref_stats)
    assert fired(res) == {"blow_up"} and res["time_fs"] == pytest.approx(60.0) and "runaway" in res["cause"]
    # dissociation: H atom 4 pulled 1.8 Å away from every O from frame 100 on (50 fs)
    pos = water200["positions"].values.copy()
    o3 = pos[100:, 3]
    pos[100:, 4] = o3 + (pos[100:, 4] - o3) / np.linalg.norm(pos[100:, 4] - o3, axis=1)[:, None] * 1.8
    st = analyze(water200.assign(positions=(("frame", "atom", "xyz"), pos))).compute()
    res = stability(st, ref_stats)
    assert fired(res) == {"dissociation"} and res["time_fs"] == pytest.approx(50.0)
    assert "H atom 4" in res["cause"] and "1.80 Å" in res["cause"]
    # a free H for less than the sustain time (5 fs) is no failure
    short = water200["positions"].values.copy()
    short[100:110, 4] = pos[100:110, 4]
    assert fired(stability(analyze(water200.assign(positions=(("frame", "atom", "xyz"), short))).compute(),
                           ref_stats)) == set()
    # structure drift: every O-H bond stretched to 1.2 Å (bonded, no ions, no collapse; g_OH is another liquid's)
    pos = water200["positions"].values[:60].copy()
    for j in (1, 2):
        d = pos[:, j::3] - pos[:, 0::3]
        pos[:, j::3] = pos[:, 0::3] + d / np.linalg.norm(d, axis=-1, keepdims=True) * 1.2
    st = analyze(water200.isel(frame=slice(0, 60)).assign(positions=(("frame", "atom", "xyz"), pos))).compute()
    res = stability(st, ref_stats)
    assert fired(res) == {"structure"} and res["time_fs"] == 0.0 and "O-H area" in res["cause"]
    assert res["rdf_area_max_per_window"][0][1] > 3.0
    assert fired(stability(st)) == set()         # without a reference the structure is not judged


def test_a_stopped_run_fails_by_blow_up_at_its_last_frame(ref_stats):
    stopped = ref_stats.copy(deep=True)
    stopped.attrs["source_status"] = "failed: step 400: temperature 6000 K exceeds 5000 K (runaway heating)"
    res = stability(stopped)
    assert fired(res) == {"blow_up"} and res["time_fs"] == pytest.approx(99.5) and "run stopped" in res["cause"]
    assert res["criteria"]["structure"]["cause"] == "no reference given: not checked"


def test_a_run_far_above_its_thermostat_target_fails_by_blow_up(water200, ref_stats):
    import json

    # the embedded frames at ~296 K, read as a run thermostatted at 150 K: 2x the target throughout
    run = water200.assign_attrs(simulation_settings=json.dumps({"temperature_K": 150.0, "dt_fs": 0.5}))
    st = analyze(run).compute()
    assert st.attrs["thermostat_target_K"] == 150.0
    res = stability(st)
    assert fired(res) == {"blow_up"} and res["time_fs"] == 0.0 and "thermostat lost" in res["cause"]
    assert "above 1.5 x the target 150 K" in res["cause"]
    # at its own temperature, or heating past 1.5x for less than the window (100 fs), it holds
    assert fired(stability(analyze(run.assign_attrs(simulation_settings=json.dumps({"temperature_K": 300.0})))
                           .compute())) == set()
    from ensemble.analysis import StabilityConfig

    cfg = StabilityConfig(thermostat_window_fs=20.0)   # 40 frames of 0.5 fs
    warm = st.copy(deep=True)
    warm.attrs["thermostat_target_K"] = 300.0
    warm["temperature"][100:120] = 500.0            # 10 fs at 500 K, then back: 20 fs means of <= ~400 K
    assert fired(stability(warm, cfg=cfg)) == set()
    warm["temperature"][100:] = 500.0               # from 50 fs on, for good
    res = stability(warm, cfg=cfg)
    assert fired(res) == {"blow_up"} and 40.0 < res["time_fs"] <= 50.0 and "thermostat lost" in res["cause"]
    # a store without a thermostat (NVE, a reference) is not judged by it
    assert "thermostat_target_K" not in ref_stats.attrs


def test_structure_windows_slide_over_long_runs():
    from ensemble.analysis import StabilityConfig, structure_windows
    ds = load_default().isel(frame=slice(0, 400))
    st = analyze(ds).compute()
    w = structure_windows(st, st, StabilityConfig(window_fs=100.0, stride_fs=25.0))
    assert [s for s, _, _ in w] == [0.0, 25.0, 50.0, 75.0, 100.0]
    assert all(a < 1.0 for _, a, _ in w)
    with pytest.raises(AnalysisError, match="stride_fs must be a finite number > 0"):
        StabilityConfig(stride_fs=float("nan"))


# ---------------------------------------------------------------- dask, merging, stores


def test_dask_equals_numpy_and_pieces_merge_to_the_whole_for_every_variable(tmp_path):
    ds = load_default().isel(frame=slice(0, 400))
    whole = analyze(ds, window_fs=50.0).compute()
    lazy = analyze(ds.chunk({"frame": 64}), window_fs=50.0)
    assert lazy["rdf"].chunks is not None and lazy["h_owner"].chunks is not None
    xr.testing.assert_allclose(lazy.compute(), whole, rtol=1e-12, atol=0)
    halves = merge([analyze(ds.isel(frame=slice(0, 200)), window_fs=50.0),
                    analyze(ds.isel(frame=slice(200, 400)), window_fs=50.0)]).compute()
    xr.testing.assert_allclose(halves, whole, rtol=1e-12, atol=0)
    assert set(halves.data_vars) == set(whole.data_vars)
    assert {"h_owner", "n_hydronium", "n_hydroxide", "n_free_hydrogen", "oo_min", "hh_intra", "h3o_angle",
            "finite"} <= set(whole.data_vars)
    assert all(whole[v].attrs["merge"] in ("concat(frame)", "concat(window)", "sum") for v in whole.data_vars)
    assert whole["oh_spectrum"].sizes["window"] == 4
    assert int(whole["oh_bond_hist"].sum()) == 400 * 256 and whole["oh_bond_hist"].attrs["merge"] == "sum"
    top = float(whole["oh_bond_hist"]["oh_bond_bin"][int(whole["oh_bond_hist"].argmax("oh_bond_bin"))])
    assert 1.00 < top < 1.06 and int(whole["hoh_angle_hist"].sum()) == 400 * 128
    assert 3400 < float(whole["oh_spectrum_peak"].mean()) < 3800        # SPC/Fw O-H stretch
    assert 2.6 < float(whole["rdf"]["r"][whole["rdf"].sel(pair="O-O").mean("frame").argmax("r")]) < 2.9
    # selecting frames of merged statistics = analysing those frames
    part = select_frames(whole, slice(100, 300))
    direct = analyze(ds.isel(frame=slice(100, 300)), window_fs=50.0).compute()
    xr.testing.assert_allclose(part.drop_vars(["window", "window_time"]).drop_dims("window"),
                               direct.drop_dims("window"), rtol=1e-12, atol=0)
    assert part["window"].values.tolist() == direct["window"].values.tolist()
    path = write_stats(lazy, tmp_path / "stats.zarr")
    back = open_stats(path)
    xr.testing.assert_allclose(back, whole, rtol=1e-12, atol=0)
    assert back["oh_bond"].attrs["units"] == "angstrom" and back["vdos"].attrs["merge"] == "concat(window)"
    assert all("units" in back[v].attrs for v in back.data_vars)
    t = species_temperature(ds.chunk({"frame": 20}))
    assert t.dims == ("frame", "species") and t.attrs["units"] == "K"


def test_the_angle_agrees_with_the_intramolecular_hh_distance(ref_stats):
    rows = run_scalars(ref_stats)
    mean, err = rows["hoh_angle_mean"].value
    from_rdf, err_rdf = rows["hoh_angle_from_rdf"].value
    assert 100 < mean < 115 and abs(from_rdf - mean) < 3 * np.hypot(err, err_rdf) + 0.5
    assert 1.55 < rows["rdf_first_peak_H-H"].value[0] < 1.75


def test_frame_range_specs():
    assert split_frame_range("a.zarr") == ("a.zarr", None)
    assert split_frame_range("a.zarr:200:") == ("a.zarr", slice(200, None))
    assert split_frame_range("dir:x/a.zarr:1:9:2") == ("dir:x/a.zarr", slice(1, 9, 2))
    with pytest.raises(AnalysisError, match="PATH:START:STOP"):
        split_frame_range("a.zarr:10")


# ---------------------------------------------------------------- spectra, rdf


def timed(ds, dt_fs=0.5, first_step=0):
    n = ds.sizes["frame"]
    return ds.assign_coords(step=("frame", first_step + np.arange(n)), time=("frame", dt_fs * (first_step + np.arange(n))))


def oscillating_water(wavenumber, frames=800, dt_fs=0.5, amplitude=0.02):
    """Two molecules; H 1 stretches as 1 + a sin(2 pi c k t); its velocity is the exact derivative."""
    atoms = np.array(molecule(np.array([3.0, 3.0, 3.0]), 1.0, 1.0, 104.5) +
                     molecule(np.array([7.0, 7.0, 7.0]), 1.0, 1.0, 104.5))
    ds = timed(water_box([atoms[:3], atoms[3:]], frames=frames), dt_fs)
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
    spec = oh_spectrum(topology(ds)["oh_bond"], ds, window_frames=200)
    assert spec.attrs["units"] == "angstrom^2 cm" and spec.sizes["window"] == 4
    # resolution 1 / 100 fs = 333.6 cm^-1; the default padding 4 makes the grid 4x finer, no sharper
    assert_allclose(spec.attrs["resolution_cm^-1"], 1 / (100 * SPEED_OF_LIGHT_CM_PER_FS), rtol=1e-12)
    assert_allclose(spec.attrs["grid_cm^-1"], spec.attrs["resolution_cm^-1"] / 4, rtol=1e-12)
    grid = spec["wavenumber"].values
    assert_allclose(np.diff(grid)[0], spec.attrs["grid_cm^-1"], rtol=1e-9)
    mean = spec.mean("window")
    assert int(mean.argmax("wavenumber")) == int(np.argmin(np.abs(grid - k0)))    # the bin holding k0
    assert_allclose(spectral_peak(spec).values, k0, atol=5.0)                      # refined within 5 cm^-1
    assert np.isnan(float(spectral_peak(mean, band=(3500.0, 4500.0))))        # only a slope in that band
    # Parseval: the integral is the bond variance averaged over the 4 hydrogens (a^2 / 2 for one of them)
    assert_allclose(float(mean.integrate("wavenumber")), 0.02 ** 2 / 2 / 4, rtol=0.02)
    unpadded = oh_spectrum(topology(ds)["oh_bond"], ds, window_frames=200, pad=1)
    assert_allclose(np.diff(unpadded["wavenumber"].values)[0], spec.attrs["resolution_cm^-1"], rtol=1e-9)
    assert_allclose(float(unpadded.mean("window").integrate("wavenumber")), 0.02 ** 2 / 2 / 4, rtol=0.1)
    d = vdos(ds, window_frames=200)
    assert_allclose(d.sel(species="H").integrate("wavenumber").values, 3.0, rtol=1e-9)   # per atom
    assert np.isnan(d.sel(species="O").values).all()          # O never moves: no spectrum to normalize
    assert_allclose(spectral_peak(d.sel(species="H").mean("window")).values, k0, atol=5.0)
    with pytest.raises(AnalysisError, match="pad"):
        oh_spectrum(topology(ds)["oh_bond"], ds, window_frames=200, pad=0)


def test_windows_follow_absolute_steps_and_unresolved_sampling_is_refused():
    ds = oscillating_water(3000.0, frames=500)
    late = timed(ds.isel(frame=slice(130, None)), first_step=130)
    spec = oh_spectrum(topology(late)["oh_bond"], late, window_frames=100)
    assert spec["window"].values.tolist() == [200, 300, 400]      # starts aligned to multiples of 100
    coarse = timed(ds.isel(frame=slice(0, None, 20)), dt_fs=10.0)
    with pytest.raises(AnalysisError, match="resolve wavenumbers only up to 1668 cm"):
        oh_spectrum(topology(coarse)["oh_bond"], coarse, window_frames=20)
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
    ds = dataset([[0.2, 5.0, 5.0], [9.77, 5.0, 5.0], [5.03, 5.0, 5.0]], ["O", "H", "H"])  # O; H 0.43 Å away via x = 0
    g = rdf(ds, r_max=5.0, bin_width=0.1)
    oh = g.sel(pair="O-H").isel(frame=0)
    nonzero = oh["r"].values[oh.values > 0]
    assert_allclose(nonzero, [0.45, 4.85], atol=1e-9)     # 0.43 Å (bin 0.4-0.5) and 4.83 Å (bin 4.8-4.9)
    assert np.isnan(g.sel(pair="O-O").values).all()       # one O: no O-O pairs, g undefined


def test_block_average_accounts_for_correlation_and_weights():
    rng = np.random.default_rng(3)
    white = rng.normal(size=4000)
    mean, sem = block_average(white, n_blocks=10)
    assert abs(mean) < 4 * sem and 0.5 < sem / (1 / np.sqrt(4000)) < 1.6
    slow = np.repeat(rng.normal(size=40), 100)          # correlated over 100 samples
    _, sem_slow = block_average(slow, n_blocks=10)
    assert sem_slow > 5 / np.sqrt(4000)                 # far above the naive white-noise error
    assert np.isnan(block_average([1.0])[1])
    # weights: frame means over 1 and 3 molecules average as the pooled molecules do
    assert block_average([10.0, 20.0], n_blocks=2, weights=[1, 3])[0] == pytest.approx(17.5)


def test_bad_settings_are_refused_before_any_work(water200):
    for kwargs, msg in (({"window_fs": 0.0}, "window_fs must be"), ({"rdf_bin": float("nan")}, "rdf_bin must be"),
                        ({"rdf_bin": 10.0}, "wider than the g\\(r\\) range"), ({"bond_max_angstrom": -1}, "bond_max"),
                        ({"pad": 0}, "pad")):
        with pytest.raises(AnalysisError, match=msg):
            analyze(water200, **kwargs)
    with pytest.raises(AnalysisError, match="has no 'positions'"):
        analyze(water200.drop_vars("positions"))
