from __future__ import annotations

import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts) runs the tests in parallel worker processes, except a run
    that selects the ``cluster`` tests: they share one SLURM, started once per session, so they run
    in this process."""
    markexpr = config.getoption("markexpr") or ""
    if not markexpr:
        return None        # xdist's own count (cores), capped by --maxprocesses
    try:                   # pytest's own parser of -m expressions (pytest 8)
        from _pytest.mark.expression import Expression
    except ImportError:    # a pytest without it: any mention of `cluster` keeps the run in one process
        return 0 if "cluster" in markexpr else None
    # the cluster tests (test_slurm.py) carry the one mark `cluster`
    return 0 if Expression.compile(markexpr).evaluate(lambda name: name == "cluster") else None


@pytest.fixture
def dft_run(tmp_path) -> Path:
    """A writable copy of the real CP2K DFT fixture (32 H2O, steps 1..5)."""
    d = tmp_path / "dft"
    shutil.copytree(DATA / "dft-h2o32", d)
    return d


@pytest.fixture
def fist_run(tmp_path) -> Path:
    """A writable copy of the real CP2K FIST fixture (16 H2O, steps 0..7, with .cell)."""
    d = tmp_path / "fist"
    shutil.copytree(DATA / "fist-h2o16", d)
    return d


def leftovers(directory: Path) -> list[str]:
    """Temporary or partial outputs left in ``directory``."""
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def embedded_store(path: Path, start: int, stop: int, block: int) -> Path:
    """Frames ``start:stop`` of the embedded trajectory written as a store at ``path``, ``block``
    frames per write (so a fixture is a store as `ensemble` writes one, chunked)."""
    from ensemble.data import load_default
    from ensemble.io.store import create_store, write_frames

    ds = load_default().isel(frame=slice(start, stop))
    n = stop - start
    create_store(path, ds.isel(frame=slice(0, 1)), n, block)
    for a in range(0, n, block):
        write_frames(path, ds.isel(frame=slice(a, a + block)), a)
    return path


def ingested_dft(directory: Path) -> Path:
    """The real CP2K DFT fixture (32 H2O, 5 steps) ingested by the command line into ``directory``."""
    from ensemble.cli import main

    out = directory / "dft.zarr"
    assert main(["ingest", str(DATA / "dft-h2o32"), "--out", str(out), "--cell", "9.8528", "9.8528", "9.8528"]) == 0
    return out


def small_water():
    """4 water molecules in a 10.2 Å box (the cutoff-5 model needs >= 10 Å) with thermal velocities:
    positions, velocities, species (list), masses, box."""
    import numpy as np

    from ensemble.waterbox import build_water_box

    wb = build_water_box(4, seed=3, box_angstrom=10.2)
    mass = {"O": 15.9994, "H": 1.00794}
    masses = np.array([mass[s] for s in wb.species])
    rng = np.random.default_rng(1)
    vel = rng.normal(size=wb.positions.shape) * np.sqrt(0.0259 / 103.64 / masses)[:, None]
    return wb.positions.copy(), vel, list(wb.species), masses, np.full(3, wb.box_angstrom)


def interrupted_and_resumed(simulate_run, tmp_path: Path, stop_step: int):
    """Run ``simulate_run(out, **extra)`` whole into a.zarr, and into b.zarr stopped (KeyboardInterrupt)
    after ``stop_step`` and then resumed; returns both stores, loaded."""
    import xarray as xr

    simulate_run(tmp_path / "a.zarr")

    def stop(step, total, elapsed):
        if step == stop_step:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate_run(tmp_path / "b.zarr", progress=stop)
    simulate_run(tmp_path / "b.zarr", resume=True)
    return (xr.open_zarr(tmp_path / "a.zarr", consolidated=False).compute(),
            xr.open_zarr(tmp_path / "b.zarr", consolidated=False).compute())
