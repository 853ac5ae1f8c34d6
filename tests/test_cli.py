from __future__ import annotations

import json
import subprocess
import sys

import pytest

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


def _demo(out, *extra, timeout=600):
    done = subprocess.run([sys.executable, "-m", "ensemble.cli", "demo", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _check_demo_outputs(out, stdout, members):
    assert "384 (H 256, O 128)" in stdout and "frames        1001" in stdout
    assert "[2/5] fitted agent-paper" in stdout and "[2/5] fitted manybody" in stdout
    doc = json.loads((out / "summary.json").read_text())
    assert len(doc["members"]) == members
    groups = {(g["model"], g["temperature_K"], g["tile"]): g for g in doc["groups"]}
    assert set(groups) == {("manybody", 296.0, 1), ("manybody", 296.0, 2), ("manybody", 320.0, 1),
                           ("manybody", 320.0, 2), ("agent", 300.0, 1)}
    cons = groups[("manybody", 296.0, 2)]
    assert cons["members"] == 2 and 1.0 < cons["oh_bond_mean"] < 1.07 and cons["temperature_err"] is not None
    scorecard = json.loads((out / "report" / "scorecard.json").read_text())
    assert len(scorecard["models"]) == 2 and "stability" in next(iter(scorecard["models"].values()))
    # like with like: the members at the reference's own temperature (296 K), named by what they are
    assert list(scorecard["models"]) == ["manybody 296 K x1 seed 1", "agent 300 K x1 seed 1"]
    assert "report of the reference (296 K) vs manybody 296 K x1 seed 1, agent 300 K x1 seed 1" in stdout
    for f in ("figures/ensemble_temperature.png", "figures/ensemble_figures.png", "report/fig6_oh_spectrum.png"):
        assert (out / f).stat().st_size > 10_000, f
    assert (out / "aggregate.zarr").is_dir() and (out / "models" / "manybody.json").is_file()
    return groups


def test_demo_runs_the_whole_pipeline_from_the_entry_point(tmp_path):
    """The README's main command, shortened (fit on every 25th frame, 200 steps per member)."""
    out = tmp_path / "demo"
    stdout = _demo(out, "--fit-stride", "25", "--steps", "200")
    _check_demo_outputs(out, stdout, members=10)
    assert "demo finished" in stdout


@pytest.mark.slow
def test_demo_as_in_the_readme(tmp_path):
    out = tmp_path / "demo"
    groups = _check_demo_outputs(out, _demo(out), members=10)
    # the paper's agent model heats far past its thermostat (a lost thermostat: blow-up), makes many
    # ions and opens the angle; the many-body model: the reference's liquid
    agent = groups[("agent", 300.0, 1)]
    assert agent["failed"] == 2 and agent["failed_criteria"] == {"blow_up": 2}
    assert agent["temperature"] > 500.0 and agent["n_hydronium"] > 1.0 and agent["hoh_angle_mean"] > 115.0
    for key in (("manybody", 296.0, 1), ("manybody", 296.0, 2), ("manybody", 320.0, 2)):
        g = groups[key]
        assert g["failed"] == 0 and abs(g["hoh_angle_mean"] - 107.72) < 0.5 and g["n_hydronium"] < 0.05, key


def test_simulate_command_and_its_errors(tmp_path, capsys):
    import numpy as np

    from ensemble.data import write_default_store
    from ensemble.invariants import WeightSet
    from ensemble.model import Model

    write_default_store(tmp_path / "ref.zarr")
    ws = WeightSet((0, 1), (1.0, 2.0))
    Model(kind="conservative", species=("H", "O"), masses=(1.00794, 15.9994), weights=ws,
          A=(np.zeros(4), np.zeros(4)), B=(np.eye(4) * 1e-3, np.eye(4) * 1e-3), cutoff_angstrom=6.0
          ).save(tmp_path / "m.json")
    args = ["simulate", "--model", str(tmp_path / "m.json"), "--init", f"{tmp_path / 'ref.zarr'}:100",
            "--steps", "6", "--stride", "3", "--temperature-K", "300", "--out", str(tmp_path / "sim.zarr")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "6 steps, 3 frames, complete" in out and "atom-steps/s" in out
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    bad = list(args)
    bad[bad.index("--init") + 1] = f"{tmp_path / 'ref.zarr'}:5000"
    assert main(bad[:-1] + [str(tmp_path / "other.zarr")]) == 2
    assert "outside the store's 1001 frames" in capsys.readouterr().err
