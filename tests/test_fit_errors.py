"""`ensemble fit` on bad input: a one-line error (exit 2) naming the store / variable / frame, no
model written, inputs unchanged; an existing model is replaced only with --overwrite; progress on
stderr while the Gram matrices are reduced."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import leftovers
from ensemble.cli import main
from ensemble.data import load_default
from ensemble.io.store import create_store, write_frames
from ensemble.model import load_model
from test_errors import tree_hash

#: a small fit: 2 weight functions, every group kept, 10-frame chunks
CONFIG = """[fit]
kind = "agent"
weights = [{kind = "exp", param = 0.5}, {kind = "gauss", param = 2.0}]
keep = "all"
chunk_frames = 10
prior = false
"""


def write_store(path: Path, ds) -> Path:
    n = ds.sizes["frame"]
    create_store(path, ds.isel(frame=slice(0, 1)), n, 10)
    for a in range(0, n, 10):
        write_frames(path, ds.isel(frame=slice(a, a + 10)), a)
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """16 H2O x 20 frames of the embedded data (box 15.64 Å), and damaged variants of it."""
    d = tmp_path_factory.mktemp("fitstores")
    base = load_default().isel(frame=slice(0, 20), atom=slice(0, 48)).compute()
    variants = {"good": base}
    v = base.copy(deep=True)
    v["positions"][8, 5, 1] = np.nan                # frame 8 trains (frames 0-3 are discarded)
    variants["nan_positions"] = v
    v = base.copy(deep=True)
    v["accelerations"][12, 7, 0] = np.inf
    variants["inf_accelerations"] = v
    variants["two_frames"] = base.isel(frame=slice(0, 2))
    variants["ten_frames"] = base.isel(frame=slice(0, 10))
    v = base.copy(deep=True)
    v["cell"][0, 1] = 1.0
    variants["triclinic"] = v
    v = base.copy(deep=True)
    v["cell"][:] = 0.0
    variants["zero_cell"] = v
    v = base.copy(deep=True)
    m = v["masses"].values.copy()
    m[1] = 2.014
    v["masses"][:] = m
    variants["mixed_masses"] = v
    variants["no_target"] = base.drop_vars(["accelerations", "forces"])
    variants["no_positions"] = base.drop_vars(["positions"])
    variants["forces_only"] = base.drop_vars(["accelerations"])
    out = {}
    for name, ds in variants.items():
        if name == "no_positions":      # create_store needs a frame variable: write one, then remove positions
            write_store(d / f"{name}.zarr", base)
            shutil.rmtree(d / f"{name}.zarr" / "positions")
            meta = json.loads((d / f"{name}.zarr" / "zarr.json").read_text())
            meta.get("consolidated_metadata", {}).get("metadata", {}).pop("positions", None)
            (d / f"{name}.zarr" / "zarr.json").write_text(json.dumps(meta))
            out[name] = d / f"{name}.zarr"
        else:
            out[name] = write_store(d / f"{name}.zarr", ds)
    (d / "fit.toml").write_text(CONFIG)
    out["config"] = d / "fit.toml"
    return out


def run_fit(args, capsys) -> tuple[int, str]:
    code = main(["fit", *[str(a) for a in args]])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("store, extra, message", [
    ("nan_positions", [], "nan_positions.zarr: variable 'positions' has non-finite values (NaN or inf) in frame 8"),
    ("inf_accelerations", [], "inf_accelerations.zarr: variable 'accelerations' has non-finite values (NaN or inf) "
                              "in frame 12"),
    ("two_frames", [], "at least one frame in each split it is asked for"),
    ("triclinic", [], "triclinic.zarr: cell: triclinic cells are not supported"),
    ("zero_cell", [], "zero_cell.zarr: cell: cell edges must be positive"),
    ("mixed_masses", [], "mixed_masses.zarr: atoms of species H have different masses [1.00794, 2.014] amu"),
    ("good", ["--cutoff", "9.0"], "good.zarr: cutoff_angstrom: cutoff 9.0 Å exceeds half the smallest box edge "
                                  "(7.8202 Å)"),
    ("no_target", [], "no_target.zarr: no variable 'forces' or 'accelerations'; a fit needs one of them"),
    ("no_positions", [], "no_positions.zarr: the trajectory has no 'positions'"),
])
def test_bad_stores_are_one_line_fit_errors(stores, tmp_path, capsys, store, extra, message):
    before = tree_hash(stores[store])
    out = tmp_path / "m.json"
    code, err = run_fit([stores[store], "--config", stores["config"], "--workers", "1", "--out", out, *extra], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and message in last, err
    assert "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / "m-selection.png").exists()
    assert leftovers(tmp_path) == []
    assert tree_hash(stores[store]) == before


def test_fewer_training_rows_than_columns_is_refused_with_the_counts(stores, tmp_path, capsys):
    # the default fit: 18 weight functions x 2 species = 36 features + 666 quadratic = 702 columns per
    # species; 10 frames train 6, and O has 16 atoms: 3 x 16 x 6 = 288 rows
    out = tmp_path / "m.json"
    code, err = run_fit([stores["ten_frames"], "--workers", "1", "--out", out], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert ("too few training rows: 288 rows (6 training frames) for species O, but the agent fit has 702 columns "
            "(36 features + 666 quadratic); need at least 702 rows") in err.strip().splitlines()[-1], err
    assert not out.exists()


def test_fit_out_never_replaces_a_model_or_an_input_and_reports_progress(stores, tmp_path, capsys):
    good = stores["good"]
    before = tree_hash(good)
    out = tmp_path / "m.json"
    out.write_text("{}")
    cases = [
        ([good, "--out", out], f"{out} already exists; choose another --out or pass --overwrite"),
        ([good, "--out", good, "--overwrite"], f"--out {good} is the input STORE {good}"),
        ([good, "--out", good / "m.json", "--overwrite"], "lies inside the input STORE"),
        ([good, stores["forces_only"], "--out", stores["forces_only"], "--overwrite"], "is the input STORE 2"),
    ]
    for args, message in cases:
        code, err = run_fit([*args, "--config", stores["config"], "--workers", "1"], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)
    assert out.read_text() == "{}" and tree_hash(good) == before
    # with --overwrite the model is replaced, atomically; the Gram reduction reports its progress
    code, err = run_fit([good, "--config", stores["config"], "--workers", "1", "--out", out, "--overwrite"], capsys)
    assert code == 0, err
    assert "\r" not in err         # not a tty: plain lines
    lines = [line for line in err.splitlines() if re.match(r"Gram reduction: \d+/20 frames", line)]
    assert lines and lines[-1].startswith("Gram reduction: 20/20 frames (") and lines[-1].endswith(" s)"), err
    done = [int(line.split()[2].split("/")[0]) for line in lines]
    assert done == sorted(done) and all(0 < n <= 20 for n in done)
    model = load_model(out)
    assert model.kind == "agent" and len(model.weights) == 2
    assert json.loads(out.read_text())["digest"]["sha256"] == model.content_digest()
    assert leftovers(tmp_path) == [] and tree_hash(good) == before


def test_an_agent_fit_takes_forces_when_a_store_has_no_accelerations(stores, tmp_path, capsys):
    from ensemble.fit.pipeline import fit_store, load_fit_config

    cfg = load_fit_config(stores["config"])
    with_acc = fit_store(stores["good"], cfg, progress=lambda m: None)
    seen = []
    forces = fit_store(stores["forces_only"], cfg, progress=lambda m: None, frame_progress=lambda d, t: seen.append((d, t)))
    for s in ("H", "O"):        # accelerations = forces / mass (the stored accelerations are rounded)
        for split in ("train", "validation", "test"):
            assert forces.table["quadratic"][s][split] == pytest.approx(with_acc.table["quadratic"][s][split], rel=1e-8)
    assert seen[-1] == (20, 20) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_progress_is_throttled_and_redraws_one_line_on_a_tty(monkeypatch):
    import io
    import sys

    from ensemble.cli import _progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    report = _progress("Gram reduction", elapsed=True)
    report(10, 30)
    report(20, 30)          # within 0.5 s of the last update: skipped
    report(30, 30)          # the last one always shows, and ends the line
    text = err.getvalue()
    assert re.fullmatch(r"\rGram reduction: 10/30 frames \(\d+\.\d s\)\rGram reduction: 30/30 frames \(\d+\.\d s\)\n",
                        text), text
