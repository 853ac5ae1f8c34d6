from __future__ import annotations

import json
import subprocess
import sys

from conftest import DATA
from ensemble.cli import main


def test_ingest_then_info(tmp_path, capsys):
    out = tmp_path / "s.zarr"
    assert main(["ingest", str(DATA / "dft-h2o32"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "5 frames x 96 atoms" in text and "H 64, O 32" in text
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["species_counts"] == {"H": 64, "O": 32}
    assert info["frames"] == 5 and info["time_fs"] == [0.5, 2.5]
    assert info["cell_lengths_angstrom"] == [9.8528, 9.8528, 9.8528]


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["ingest", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.zarr"), "--format", "cp2k"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing CP2K positions file" in err
    assert main(["info", str(tmp_path / "nope.zarr")]) == 2
    assert "no such store" in capsys.readouterr().err
    assert main(["ingest", str(DATA / "dft-h2o32"), "--out", str(tmp_path / "y.zarr"), "--masses", "H"]) == 2
    assert "--masses expects LABEL=AMU" in capsys.readouterr().err
    assert not (tmp_path / "y.zarr").exists()


def test_demo_runs_from_the_installed_entry_point(tmp_path):
    done = subprocess.run([sys.executable, "-m", "ensemble.cli", "demo", "--out", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "384 (H 256, O 128)" in done.stdout
    assert "frames        1001" in done.stdout
    assert (tmp_path / "demo" / "reference.zarr").is_dir()
