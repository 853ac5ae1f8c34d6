from __future__ import annotations

import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


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
