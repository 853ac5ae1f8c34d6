"""One learning-based simulation: learned-model NVE energy, bitwise resume, explosion, tiling."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from numpy.testing import assert_allclose

from ensemble.fit import FitConfig, Splits, fit_store
from ensemble.invariants import EXPONENTIAL, GAUSSIAN, POWER, WeightSet, invariants_frame, species_index
from conftest import embedded_store
from ensemble.io.store import open_trajectory
from ensemble.md import SimulationError, initial_state, simulate, tile
from ensemble.model import Model

WS = WeightSet((EXPONENTIAL, EXPONENTIAL, GAUSSIAN, GAUSSIAN, POWER), (1.0, 0.5, 1.0, 2.0, 2.0))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """All 128 molecules, 80 frames of the embedded data."""
    return embedded_store(tmp_path_factory.mktemp("sim") / "ref.zarr", 0, 80, 40)


@pytest.fixture(scope="module")
def conservative_model(store):
    cfg = FitConfig(kind="conservative", weights=WS, keep=5, cutoff_angstrom=5.0, width_angstrom=1.0,
                    chunk_frames=20, frame_stride=4, splits=Splits(0.0, 0.8, 0.2, 0.0))
    return fit_store(store, cfg, progress=lambda m: None).model


def test_learned_conservative_model_conserves_energy_in_nve(store, conservative_model, tmp_path):
    init = initial_state(f"{store}:10")
    summary = simulate(conservative_model, init, steps=200, dt_fs=0.25, stride=20, out=tmp_path / "nve.zarr")
    assert summary.status == "complete" and summary.frames == 11
    ds = xr.open_zarr(tmp_path / "nve.zarr", consolidated=False)
    e = ds["thermo_conserved"].values
    k = ds["thermo_kinetic_energy"].values
    # 50 fs of NVE with the fitted model: E_kin + E is flat to 1 % of the kinetic energy's swings
    assert np.abs(e - e[0]).max() < 0.01 * np.ptp(k)
    assert np.isfinite(ds["positions"].values).all()
    traj = open_trajectory(tmp_path / "nve.zarr")
    assert traj.attrs["status"] == "complete" and traj["step"].values.tolist() == list(range(0, 201, 20))
    for name in ("positions", "velocities", "forces", "temperature", "thermo_temperature_H"):
        assert "units" in traj[name].attrs


def test_resume_is_bitwise_identical(store, conservative_model, tmp_path):
    init = initial_state(f"{store}:5", temperature_K=300.0, seed=7)
    kw = dict(steps=60, dt_fs=0.5, temperature_K=300.0, stride=5, checkpoint_every=20, block_frames=3)
    simulate(conservative_model, init, out=tmp_path / "a.zarr", **kw)

    def stop_at_45(step, total, elapsed):
        if step == 45:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(conservative_model, init, out=tmp_path / "b.zarr", progress=stop_at_45, **kw)
    assert "stopped at step 45" in open_trajectory(tmp_path / "b.zarr").attrs["status"]
    simulate(conservative_model, init, out=tmp_path / "b.zarr", resume=True, **kw)
    a = xr.open_zarr(tmp_path / "a.zarr", consolidated=False).compute()
    b = xr.open_zarr(tmp_path / "b.zarr", consolidated=False).compute()
    for name in ("positions", "velocities", "forces", "thermo_conserved", "thermo_temperature", "step"):
        np.testing.assert_array_equal(b[name].values, a[name].values)
    assert b.sizes["frame"] == 13 and b.sizes["md_step"] == 60
    with pytest.raises(ValueError, match="stride was 5, now 10"):
        simulate(conservative_model, init, out=tmp_path / "b.zarr", resume=True, **{**kw, "stride": 10})


def test_exploding_model_stops_with_the_step_and_keeps_output(store, tmp_path):
    p = 2 * len(WS)
    rng = np.random.default_rng(0)
    bad = Model(kind="agent", species=("H", "O"), masses=(1.00794, 15.9994), weights=WS,
                A=(rng.normal(size=p) * 50, rng.normal(size=p) * 50), B=(np.zeros((p, p)), np.zeros((p, p))),
                cutoff_angstrom=5.0)
    init = initial_state(f"{store}:0")
    with pytest.raises(SimulationError, match=r"step \d+: temperature \d+ K exceeds 5000 K"):
        simulate(bad, init, steps=2000, dt_fs=0.5, stride=2, block_frames=5, out=tmp_path / "x.zarr")
    ds = open_trajectory(tmp_path / "x.zarr")
    assert ds.attrs["status"].startswith("failed: step")
    assert ds.sizes["frame"] >= 1 and np.isfinite(ds["positions"].values).all()


def test_tiling_preserves_density_and_cutoff_invariants(store):
    init = initial_state(f"{store}:3")
    big = tile(init, 2)
    assert len(big.species) == 8 * len(init.species)
    assert_allclose(len(big.species) / np.prod(big.box), len(init.species) / np.prod(init.box))
    codes, _ = species_index(np.array(init.species), ["H", "O"])
    big_codes = np.tile(codes, 8)
    k, p = WS.arrays()
    small = invariants_frame(init.positions, init.box, codes, 2, k, p, 7.0, 1.0)
    large = invariants_frame(big.positions, big.box, big_codes, 2, k, p, 7.0, 1.0)
    n = len(codes)
    for copy in range(8):
        assert_allclose(large[0][copy * n:(copy + 1) * n], small[0], rtol=1e-12, atol=1e-14)
        assert_allclose(large[1][copy * n:(copy + 1) * n], small[1], rtol=1e-10, atol=1e-13)
    # a cutoff beyond half the (untiled) box is refused
    with pytest.raises(ValueError, match="exceeds half the smallest box edge"):
        Model(kind="agent", species=("H", "O"), masses=(1.00794, 15.9994), weights=WS, A=(np.zeros(10),) * 2,
              B=(np.zeros((10, 10)),) * 2, cutoff_angstrom=9.0).forces(init.positions, init.box, np.array(init.species))


# ---------------------------------------------------------------- interrupted at every write

class Crash(Exception):
    """Stands for a kill or power loss at one point of the run (no handler of simulate catches it)."""


def small_model():
    """A cheap, stable conservative model for 16 H2O in a 7.83 Å box (cutoff 3.5 Å)."""
    p = 2 * len(WS)
    a = np.zeros(p)
    a[[0, len(WS)]] = 0.05                    # weak exp(-r) pair repulsion between all species
    return Model(kind="conservative", species=("H", "O"), masses=(1.00794, 15.9994), weights=WS,
                 A=(a, a.copy()), B=(np.zeros((p, p)), np.zeros((p, p))), cutoff_angstrom=3.5, width_angstrom=1.0)


@pytest.fixture
def cut_run(fist_run, tmp_path, monkeypatch):
    """(run(cut_at) -> final Dataset, reference Dataset, number of writes of one run): a short NVT
    run cut at its ``cut_at``-th file write, rename or delete, then resumed (or started again if
    the cut came before the store existed)."""
    import os
    import shutil

    import zarr.storage._local as local
    from ensemble.io.cp2k import ingest_cp2k

    ingest_cp2k(fist_run, tmp_path / "fist.zarr", overwrite=False)
    model = small_model()
    init = initial_state(f"{tmp_path / 'fist.zarr'}:0", temperature_K=300.0, seed=3)
    kw = dict(steps=8, dt_fs=0.5, temperature_K=300.0, stride=2, checkpoint_every=4, block_frames=2)
    simulate(model, init, out=tmp_path / "ref.zarr", **kw)
    ref = xr.open_zarr(tmp_path / "ref.zarr", consolidated=True).compute()
    calls = {"n": 0, "at": None}
    real = {"put": local._put, "replace": os.replace, "rmtree": shutil.rmtree}

    def counted(name):
        def f(*args, **kwargs):
            calls["n"] += 1
            if calls["at"] is not None and calls["n"] == calls["at"]:
                raise Crash(f"cut at write {calls['n']} ({name})")
            return real[name](*args, **kwargs)
        return f

    monkeypatch.setattr(local, "_put", counted("put"))
    monkeypatch.setattr(os, "replace", counted("replace"))
    monkeypatch.setattr(shutil, "rmtree", counted("rmtree"))
    simulate(model, init, out=tmp_path / "count.zarr", **kw)
    total = calls["n"]

    def run(k, progress=None):
        out = tmp_path / f"cut{k}.zarr"
        calls.update(n=0, at=k)
        with pytest.raises((Crash, KeyboardInterrupt)):
            simulate(model, init, out=out, progress=progress, **kw)
        calls.update(at=None)
        if out.exists():          # the store appears only with a complete checkpoint: resume it
            simulate(model, init, out=out, resume=True, **kw)
        else:                     # cut while the store was being created: nothing to resume, start again
            simulate(model, init, out=out, **kw)
        got = xr.open_zarr(out, consolidated=True).compute()
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(f".cut{k}.zarr")], k
        real["rmtree"](out)
        return got

    return run, ref, total


def assert_same_run(got, ref, what):
    assert got.attrs["status"] == "complete", what
    for name in ("positions", "velocities", "step", "thermo_conserved", "thermo_temperature", "md_step"):
        np.testing.assert_array_equal(got[name].values, ref[name].values, err_msg=f"{what}: {name}")


def test_a_run_cut_at_sampled_writes_or_stopped_at_any_step_resumes_to_the_same_trajectory(cut_run):
    """Every 8th file write (zarr writes each file atomically) and Ctrl-C at every MD step: the
    resumed store equals an uninterrupted run bitwise. (`-m slow` cuts at every write.)"""
    run, ref, total = cut_run
    assert total > 40
    for k in range(1, total + 1, 8):
        assert_same_run(run(k), ref, f"cut at write {k}")

    for step in range(1, 9):
        def stop(s, n, elapsed, step=step):
            if s == step:
                raise KeyboardInterrupt
        assert_same_run(run(None, progress=stop), ref, f"Ctrl-C at step {step}")


@pytest.mark.slow
def test_a_run_cut_at_every_write_resumes_to_the_same_trajectory(cut_run):
    run, ref, total = cut_run
    for k in range(1, total + 1):
        assert_same_run(run(k), ref, f"cut at write {k}")


def test_resume_refuses_another_model_or_initial_state(fist_run, tmp_path):
    from ensemble.io.cp2k import ingest_cp2k
    from ensemble.md.output import ResumeError

    ingest_cp2k(fist_run, tmp_path / "fist.zarr", overwrite=False)
    model = small_model()
    init = initial_state(f"{tmp_path / 'fist.zarr'}:0")
    kw = dict(steps=4, dt_fs=0.5, stride=2, checkpoint_every=2)
    simulate(model, init, out=tmp_path / "a.zarr", **kw)
    other = Model(**{**model.__dict__, "A": tuple(a * 1.01 for a in model.A)})
    with pytest.raises(ResumeError, match="the model differs"):
        simulate(other, init, out=tmp_path / "a.zarr", resume=True, **kw)
    with pytest.raises(ResumeError, match="the initial state differs"):
        simulate(model, initial_state(f"{tmp_path / 'fist.zarr'}:1"), out=tmp_path / "a.zarr", resume=True, **kw)
    with pytest.raises(ResumeError, match="not a simulation store"):
        simulate(model, init, out=tmp_path / "fist.zarr", resume=True, **kw)
    with pytest.raises(ResumeError, match="no such store"):
        simulate(model, init, out=tmp_path / "none.zarr", resume=True, **kw)
