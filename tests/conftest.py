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
