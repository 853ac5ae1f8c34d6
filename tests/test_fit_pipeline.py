"""The fit pipeline and `ensemble fit` on a small store, with a real LocalCluster."""

from __future__ import annotations

import json

import numpy as np
import pytest
from numpy.testing import assert_allclose

from ensemble.cli import main
from ensemble.data import load_default
from ensemble.fit import FitConfig, Splits, fit_store, load_fit_config
from ensemble.invariants import EXPONENTIAL, GAUSSIAN, POWER, WeightSet
from ensemble.io.store import create_store, write_frames
from ensemble.model import load_model

WS4 = WeightSet((EXPONENTIAL, EXPONENTIAL, GAUSSIAN, POWER), (1.0, 0.5, 2.0, 1.0))


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """16 molecules x 60 frames of the embedded data as a store."""
    ds = load_default().isel(frame=slice(0, 60), atom=slice(0, 48))
    path = tmp_path_factory.mktemp("fit") / "small.zarr"
    create_store(path, ds.isel(frame=slice(0, 1)), 60, 20)
    for a in range(0, 60, 20):
        write_frames(path, ds.isel(frame=slice(a, a + 20)), a)
    return path


def test_config_file_and_overrides(tmp_path):
    cfg = load_fit_config("configs/fit.toml")
    assert cfg.kind == "agent" and len(cfg.weights) == 18 and cfg.keep == 7 and cfg.cutoff_angstrom is None
    assert cfg.splits == Splits(0.2, 0.6, 0.1, 0.1)
    cut = load_fit_config("configs/fit.toml", kind="conservative", neighbour_mode="cutoff", cutoff_angstrom=5.0)
    assert cut.kind == "conservative" and cut.cutoff_angstrom == 5.0
    bad = tmp_path / "bad.toml"
    bad.write_text("[fit]\nkeep_all = true\n")
    with pytest.raises(ValueError, match=r"unknown keys in \[fit\]: \['keep_all'\]"):
        load_fit_config(bad)


@pytest.mark.parametrize("kind", ["agent", "conservative"])
def test_fit_store_model_reproduces_its_fit(small_store, kind):
    cfg = FitConfig(kind=kind, weights=WS4, keep=2, chunk_frames=15, splits=Splits(0.0, 0.7, 0.15, 0.15))
    report = fit_store(small_store, cfg, progress=lambda m: None)
    model = report.model
    assert model.kind == kind and len(model.weights) <= 4
    assert [c[0] for c in next(iter(report.curves.values()))] == [4, 3, 2, 1]
    # the saved model's predictions on training frames give the train error the fit reported
    ds = load_default().isel(frame=slice(0, 42), atom=slice(0, 48)).compute()
    box = np.diag(ds["cell"].values)
    pred = np.stack([model.accelerations(p, box, ds["species"].values) for p in ds["positions"].values])
    ref = ds["accelerations"].values
    for s in ("H", "O"):
        at = np.array([str(x) == s for x in ds["species"].values])
        rel = np.sqrt(np.mean((pred[:, at] - ref[:, at]) ** 2) / np.mean(ref[:, at] ** 2))
        assert_allclose(rel, report.table["quadratic"][s]["train"], rtol=1e-6)
        assert report.table["quadratic"][s]["train"] < 1.0


def test_cli_fit_writes_model_table_and_figure(small_store, tmp_path, capsys):
    cfg = tmp_path / "fit.toml"
    cfg.write_text('[fit]\nkeep = 2\nchunk_frames = 20\nweights = [{kind = "exp", param = 1.0}, '
                   '{kind = "gauss", param = 2.0}, {kind = "power", param = 1.0}]\n'
                   '[splits]\ndiscard = 0.0\ntrain = 0.7\nvalidation = 0.15\ntest = 0.15\n')
    out = tmp_path / "m.json"
    assert main(["fit", str(small_store), "--config", str(cfg), "--out", str(out), "--workers", "2"]) == 0
    text = capsys.readouterr().out
    assert "quadratic  validation" in text and "kept for H" in text
    model = load_model(out)
    assert model.kind == "agent"
    d = json.loads(out.read_text())
    assert set(d["metrics"]["relative_rmse"]["quadratic"]) == {"H", "O"}
    assert (tmp_path / "m-selection.png").stat().st_size > 5000
    assert main(["fit", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "x.json")]) == 2
    assert "no such store" in capsys.readouterr().err


def test_cli_fit_on_an_existing_scheduler(small_store, tmp_path, capsys):
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0") as cl:
        out = tmp_path / "s.json"
        assert main(["fit", str(small_store), "--scheduler", cl.scheduler_address, "--keep", "16",
                     "--chunk-frames", "30", "--out", str(out)]) == 0
        assert load_model(out).kind == "agent"
    assert "kept for O" in capsys.readouterr().out
