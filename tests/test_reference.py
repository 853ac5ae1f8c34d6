"""CP2K reference runs: inputs, resume bookkeeping, and (with CP2K installed) a real run."""

from __future__ import annotations

import shutil
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ensemble.io import open_trajectory
from ensemble.io.cp2k import index_xyz, read_cell_file, read_ener
from ensemble.io.cp2k_input import parse_input
from ensemble.reference import (ConfigError, Cp2kNotFound, equilibration_input, find_cp2k, load_reference_config,
                                production_input, truncate_outputs)

ROOT = Path(__file__).resolve().parents[1]
FIST = ROOT / "configs" / "cp2k" / "fist-spcfw-nve.inp"
HAVE_CP2K = shutil.which("cp2k.psmp") is not None or shutil.which("cp2k") is not None


def small_config(tmp_path: Path, prod_steps: int = 600) -> Path:
    cfg = tmp_path / "small.toml"
    cfg.write_text(f"""
[system]
n_molecules = 16
seed = 11
[equilibration]
input = "{FIST}"
steps = 200
timecon_fs = 20.0
[production]
input = "{FIST}"
steps = {prod_steps}
""")
    return cfg


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs" / "reference").glob("*.toml")):
        cfg = load_reference_config(path)
        assert cfg.production.input.is_file() and cfg.equilibration.thermostat == "CSVR"
    paper = load_reference_config(ROOT / "configs" / "reference" / "dft-pade-128.toml")
    assert (paper.n_molecules, paper.box_angstrom) == (128, 15.6404)
    text = production_input(paper, "../water.xyz", 1000, "../equilibration/equilibration-1.restart")
    root = parse_input(text)
    assert root.section("FORCE_EVAL").keyword("METHOD") == "QS"
    assert root.section("FORCE_EVAL/DFT/MGRID").keyword("CUTOFF") == "280"
    assert root.section("FORCE_EVAL/DFT/XC/XC_FUNCTIONAL").parameter.upper() == "PADE"
    assert root.section("MOTION/MD").keyword("TIMESTEP") == "0.5"
    assert root.section("MOTION/MD").keyword("ENSEMBLE") == "NVE"
    for what in ("TRAJECTORY", "VELOCITIES", "FORCES"):
        assert root.section(f"MOTION/PRINT/{what}/EACH").keyword("MD") == "1"
    ext = root.section("EXT_RESTART")
    assert ext.keyword("RESTART_POS") == "T" and ext.keyword("RESTART_VEL") == "T"
    assert ext.keyword("RESTART_COUNTERS") == "F"


def test_equilibration_input_is_nvt_csvr(tmp_path):
    cfg = load_reference_config(small_config(tmp_path))
    root = parse_input(equilibration_input(cfg, "../water.xyz"))
    md = root.section("MOTION/MD")
    assert md.keyword("ENSEMBLE") == "NVT" and md.keyword("STEPS") == "200"
    assert md.section("THERMOSTAT").keyword("TYPE") == "CSVR"
    assert md.section("THERMOSTAT").keyword("REGION") == "MASSIVE"
    assert md.section("THERMOSTAT/CSVR").keyword("TIMECON") == "[fs] 20.0"
    assert root.section("FORCE_EVAL/SUBSYS/TOPOLOGY").keyword("COORD_FILE_NAME") == "../water.xyz"
    L = cfg.box_angstrom
    assert root.section("FORCE_EVAL/SUBSYS/CELL").keyword("ABC") == f"[angstrom] {L:.10f} {L:.10f} {L:.10f}"


def test_config_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[system]\nn_molecules = 4\n")
    with pytest.raises(ConfigError, match=r"missing section \[equilibration\]"):
        load_reference_config(bad)
    bad.write_text(small_config(tmp_path).read_text().replace("seed = 11", "seed = 'x'"))
    with pytest.raises(ConfigError, match=r"seed = 'x' should be int"):
        load_reference_config(bad)


def test_missing_cp2k_says_how_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(Cp2kNotFound, match=r"apt-get install -y cp2k"):
        find_cp2k()


def test_truncate_outputs_cuts_after_the_restart_step(fist_run):
    truncate_outputs(fist_run, "production", 3)
    for kind in ("pos", "vel", "frc"):
        ix = index_xyz(fist_run / f"production-{kind}-1.xyz")
        assert ix.steps.tolist() == [0, 1, 2, 3]
    assert read_ener(fist_run / "production-1.ener")["step"].tolist() == [0, 1, 2, 3]
    assert read_cell_file(fist_run / "production-1.cell")["step"].tolist() == [0, 1, 2, 3]


def _cli(*args, cwd):
    return [sys.executable, "-m", "ensemble.cli", *map(str, args)]


@pytest.mark.cp2k
@pytest.mark.skipif(not HAVE_CP2K, reason="CP2K is not installed (apt-get install -y cp2k)")
def test_reference_run_stop_and_resume_equals_uninterrupted(tmp_path):
    # 1500 production steps, restart files every 300: wherever after step 300 the interrupt lands
    # (CP2K writes its .ener in bursts and a loaded machine polls late), there is a restart behind it
    # and steps after it to lose; the run resumes from the last restart before the interrupt
    prod = 1500
    cfg = small_config(tmp_path, prod_steps=prod)
    # uninterrupted
    subprocess.run(_cli("reference", cfg, "--out", tmp_path / "a.zarr", cwd=tmp_path), check=True,
                   cwd=tmp_path, capture_output=True)
    # interrupted with Ctrl-C after the restart at step 300, then resumed with the same command
    cmd = _cli("reference", cfg, "--out", tmp_path / "b.zarr", cwd=tmp_path)
    # SIGINT at its default in the child: a test run started in the background (nohup ... &) inherits
    # it ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # interrupt once CP2K has written a production restart file past step 0 (its .ener is written in
    # buffered bursts, so line counts lag; a restart file is complete when it is renamed into place)
    restart = tmp_path / "b.zarr.cp2k" / "production" / "production-1.restart"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            md = parse_input(restart.read_text()).section("MOTION/MD") if restart.exists() else None
            if md is not None and int(md.keyword("STEP_START_VAL") or 0) >= 300:
                break
        except (OSError, ValueError):
            pass                       # being written: look again
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    found = re.search(r"resume from step (\d+)", err)
    assert found and 300 <= int(found.group(1)) < prod, err
    restart = int(found.group(1))
    assert not (tmp_path / "b.zarr").exists()
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resuming from step {restart}" in done.stderr
    a, b = open_trajectory(tmp_path / "a.zarr"), open_trajectory(tmp_path / "b.zarr")
    assert b["step"].values.tolist() == list(range(prod + 1))
    assert b.attrs["kinetic_energy_check"]["max_rel_error"] < 1e-6
    assert b.attrs["reference_run"]["production_steps"] == prod
    # CP2K restarts from full-precision restart files: the continuation matches the straight run
    np.testing.assert_allclose(b["positions"].values, a["positions"].values, rtol=0, atol=1e-6)
    np.testing.assert_allclose(b["conserved_energy"].values, a["conserved_energy"].values, rtol=1e-9)
    # NVE production: CP2K's conserved energy fluctuates far less than the kinetic energy
    # (velocity Verlet at 0.5 fs; measured ratio ~0.004 for this system)
    e, k = b["conserved_energy"].values, b["kinetic_energy"].values
    assert e.std() < 0.02 * k.std()
