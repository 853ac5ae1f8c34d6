"""Bad input across every command: a clear one-line error (exit 2), nothing written, inputs unchanged.

A corpus of bad invocations, grouped by class (damaged stores, bad option values, ...). Each case
asserts the exit code, the message, that no output appeared and that the inputs' bytes are the
same before and after. Grow it with every new command.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DATA, ingested_dft, leftovers
from ensemble.cli import main


def tree_hash(path: Path) -> str:
    """sha256 over every file's relative path and bytes under ``path`` (or of one file)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """The real CP2K DFT fixture (32 H2O, 5 steps) as a trajectory store."""
    return ingested_dft(tmp_path_factory.mktemp("store"))


def damaged(store: Path, tmp_path: Path, how: str) -> Path:
    import shutil

    copy = tmp_path / f"{how}.zarr"
    shutil.copytree(store, copy)
    chunk = next((copy / "positions" / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    if how == "missing":
        chunk.unlink()
    else:
        chunk.write_bytes(b"not a zstd frame")
    return copy


def run_cli(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("how", ["missing", "corrupt"])
def test_a_damaged_store_is_an_error_in_every_command_never_fill_values(store, tmp_path, capsys, how):
    bad = damaged(store, tmp_path, how)
    before = tree_hash(bad)
    out = tmp_path / "out"
    cases = [
        (["export", bad, "--out", out / "x.extxyz"], out / "x.extxyz"),
        (["analyze", bad, "--out", out / "s.zarr"], out / "s.zarr"),
        (["report", bad, bad, "--out", out / "rep"], out / "rep"),
        (["simulate", "--model", DATA / "models" / "conservative-c5.json", "--init", f"{bad}:2", "--steps", "2",
          "--nve", "--out", out / "sim.zarr"], out / "sim.zarr"),
        (["fit", bad, "--kind", "agent", "--workers", "1", "--out", out / "m.json"], out / "m.json"),
    ]
    for args, written in cases:
        code, err = run_cli(args, capsys)
        assert code == 2, (args, err)
        assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err, err   # one line
        assert "Compute Failed" not in err, err
        assert f"{bad}: variable 'positions'" in err, err
        assert ("chunk file positions/c/0" in err) if how == "missing" else ("cannot be read" in err), err
        assert not written.exists(), args
    assert tree_hash(bad) == before
    assert not out.exists() or leftovers(out) == []


SIM = ["simulate", "--model", str(DATA / "models" / "conservative-c5.json"), "--init", "{store}:2", "--steps", "3", "--out", "{tmp}/a.zarr"]


@pytest.mark.parametrize("args, message", [
    (["analyze", "{store}", "--out", "{tmp}/a.zarr", "--rdf-bin", "0"], "rdf_bin must be a finite number > 0, got 0.0"),
    (["analyze", "{store}", "--out", "{tmp}/a.zarr", "--window-fs", "nan"], "window_fs must be a finite number > 0"),
    (["analyze", "{store}", "--out", "{tmp}/a.zarr", "--pad", "0"], "pad (zero padding factor"),
    (["analyze", "{store}", "--out", "{tmp}/a.zarr", "--bond-max", "-1"], "bond_max_angstrom must be"),
    (["analyze", "{store}:3", "--out", "{tmp}/a.zarr"], "a frame range is PATH:START:STOP"),
    (["analyze", "{store}:0:1", "--out", "{tmp}/a.zarr"], "selects 1 of 5 frames; need at least 2"),
    (["analyze", "{tmp}/nothing.zarr", "--out", "{tmp}/a.zarr"], "nothing.zarr: no such store"),
    (["report", "{store}", "{store}", "--out", "{tmp}/rep", "--blocks", "1"], "--blocks must be an integer >= 2"),
    (["report", "{store}", str(DATA / "models"), "--out", "{tmp}/rep"], "not a readable zarr v3 store"),
    (SIM + ["--temperature-K", "300", "--seed", "1", "--init-temperature-K", "-5"],
     "--init-temperature-K must be a finite temperature >= 0 K, got -5.0"),
    (SIM + ["--temperature-K", "300", "--seed", "-3"], "--seed must be an integer >= 0, got -3"),
    (SIM + ["--temperature-K", "300", "--max-force", "-1"], "max_force_ev_per_angstrom must be a finite number > 0"),
    (SIM + ["--temperature-K", "300", "--stride", "0"], "stride must be an integer >= 1, got 0"),
    (SIM + ["--temperature-K", "300", "--tile", "0"], "tile must be an integer >= 1, got 0"),
    (SIM + ["--temperature-K", "300", "--checkpoint-every", "0"], "checkpoint_every must be an integer >= 1"),
    (SIM + ["--temperature-K", "300", "--dt-fs", "nan"], "dt_fs must be a finite number > 0, got nan"),
    (SIM + ["--temperature-K", "inf"], "temperature_K must be a finite number > 0, got inf"),
    (SIM + ["--temperature-K", "300", "--tau-fs", "0"], "tau_fs must be a finite number > 0"),
    (SIM, "give --temperature-K for NVT"),
])
def test_bad_option_values_are_one_line_errors(store, tmp_path, capsys, args, message):
    before = tree_hash(store)
    code, err = run_cli([a.format(store=store, tmp=tmp_path) for a in args], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "rep").exists()
    assert tree_hash(store) == before


def test_python_dash_m_runs_the_command_line():
    done = subprocess.run([sys.executable, "-m", "ensemble", "info", "/nonexistent.zarr"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == "error: /nonexistent.zarr: no such store"


def test_outputs_never_alias_inputs(store, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(DATA / "dft-h2o32", run)
    model = tmp_path / "model.json"
    shutil.copyfile(DATA / "models" / "conservative-c5.json", model)
    before = {p.name: tree_hash(p) for p in [store, run, model]}
    cell = ["--cell", "9.8528", "9.8528", "9.8528"]
    cases = [
        (["analyze", store, "--out", store, "--overwrite"], "is the input STORE"),
        (["analyze", f"{store}:0:4", "--out", store / "stats", "--overwrite"], "lies inside the input STORE"),
        (["export", store, "--out", store / "positions", "--overwrite"], "lies inside the input STORE"),
        (["report", store, f"{store}:1:4", "--out", store.parent, "--overwrite"], "contains the input REFERENCE"),
        (["ingest", run, "--out", run / "H2O-32-pos-1.xyz", "--overwrite", *cell], "is the input SOURCE file"),
        (["ingest", run / "H2O-32", "--out", run / "H2O-32-1.ener", "--overwrite", *cell], "is the input SOURCE file"),
        (["ingest", run, "--out", run, "--overwrite", *cell], "is the input SOURCE"),
        (["simulate", "--model", model, "--init", f"{store}:2", "--out", store, "--overwrite", "--steps", "2",
          "--temperature-K", "300"], "is the input --init"),
        (["simulate", "--model", model, "--init", f"{store}:2", "--out", store / "sim.zarr", "--overwrite",
          "--steps", "2", "--temperature-K", "300"], "lies inside the input --init"),
        (["simulate", "--model", model, "--init", f"{store}:2", "--out", model, "--overwrite", "--steps", "2",
          "--temperature-K", "300"], "is the input --model"),
    ]
    for args, message in cases:
        code, err = run_cli(args, capsys)
        assert code == 2 and message in err and "writing it would destroy the input" in err, (args, err)
    # an output under a path that is a file: one line, nothing written (was "[Errno 17] File exists")
    afile = tmp_path / "afile"
    afile.write_text("")
    ens = tmp_path / "e.toml"
    ens.write_text(f'[ensemble]\nname = "x"\nreference = "{store}"\n[models]\nc = "{model}"\n'
                   '[defaults]\nsteps = 4\ntemperature_K = 300.0\n')
    for args in (["analyze", store, "--out", afile / "s.zarr"], ["export", store, "--out", afile / "x.extxyz"],
                 ["report", store, f"{store}:1:4", "--out", afile / "rep"],
                 ["simulate", "--model", model, "--init", f"{store}:2", "--out", afile / "sim.zarr", "--steps", "2",
                  "--temperature-K", "300"],
                 ["fit", store, "--kind", "agent", "--out", afile / "m.json"],
                 ["run", ens, "--out", afile / "ens"]):
        code, err = run_cli(args, capsys)
        assert code == 2 and f"{afile} is a file, not a directory" in err and err.count("\n") == 1, (args, err)
    assert afile.read_text() == ""
    assert before == {p.name: tree_hash(p) for p in [store, run, model]}
    # writing a new store inside a run directory is fine: the directory is a container of inputs
    assert run_cli(["ingest", run, "--out", run / "new.zarr", *cell], capsys)[0] == 0
    assert leftovers(run) == [] and leftovers(store.parent) == []


def test_info_json_carries_provenance(store, capsys):
    import json

    assert main(["info", str(store), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    prov = doc["provenance"]
    assert prov["created_by"].startswith("ensemble ") and prov["source_format"] == "cp2k-xyz"
    roles = {f["role"]: f for f in prov["source_files"]}
    assert roles["positions"]["path"].endswith("H2O-32-pos-1.xyz") and len(roles["positions"]["sha256"]) == 64


@pytest.mark.parametrize("body, message", [
    ('[ensemble]\nnmae = "x"\nreference = "embedded"\n[models]\nc = "m.json"\n', "[ensemble]: unknown key 'nmae'"),
    ('[ensemble]\nreference = "embedded"\nwindow_fs = nan\n[models]\nc = "m.json"\n', "window_fs = nan should be"),
    ('[ensemble]\nreference = "embedded"\n[models]\nc = "m.json"\n[defaults]\ntemperature_K = inf\n',
     "temperature_K = inf should be a finite number"),
    ('[ensemble]\nreference = "embedded"\n[models]\nc = "m.json"\n[defaults]\nsteps = "ten"\n', "steps = 'ten' should be int"),
    ('[ensemble]\nreference = "embedded"\n[models]\nc = 3\n', "[models]: c = 3 should be the path"),
    ('[ensemble]\nreference = "embedded"\n[models]\nc = "m.json"\n[defaults]\ndt_fs = -1.0\n', "dt_fs must be > 0"),
    ('[ensemble]\nreference = "embedded"\n[models]\nc = "m.json"\nmembers = 3\n', "[models]: members = 3"),
])
def test_bad_ensemble_configs_are_one_line_errors(tmp_path, capsys, body, message):
    import shutil

    shutil.copyfile(DATA / "models" / "conservative-c5.json", tmp_path / "m.json")
    (tmp_path / "e.toml").write_text(body)
    code, err = run_cli(["run", tmp_path / "e.toml", "--out", tmp_path / "out"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_an_unreachable_scheduler_is_one_line_and_nothing_is_written(tmp_path, capsys):
    import shutil

    shutil.copyfile(DATA / "models" / "conservative-c5.json", tmp_path / "m.json")
    (tmp_path / "e.toml").write_text('[ensemble]\nreference = "embedded"\n[models]\nc = "m.json"\n')
    code, err = run_cli(["run", tmp_path / "e.toml", "--out", tmp_path / "out", "--scheduler", "tcp://127.0.0.1:9"],
                        capsys)
    assert code == 2 and "no dask scheduler answers there" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "out").exists()
    code, err = run_cli(["run", tmp_path / "e.toml", "--out", tmp_path / "m.json" / "x"], capsys)
    assert code == 2 and "lies inside the input model c" in err
