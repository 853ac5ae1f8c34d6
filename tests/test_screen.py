"""The ridge scan of a fit and the stability screen that picks among its candidates."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from numpy.testing import assert_allclose

from ensemble.fit import FitConfig, Splits, fit_store
from ensemble.invariants import EXPONENTIAL, GAUSSIAN, POWER, WeightSet
from conftest import embedded_store
from ensemble.md import initial_state
from ensemble.screen import ScreenError, ScreenSettings, screen_candidates, with_ridge_scan

WS = WeightSet((EXPONENTIAL, EXPONENTIAL, GAUSSIAN, GAUSSIAN, POWER), (1.0, 0.5, 1.0, 2.0, 2.0))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """All 128 molecules, 80 frames of the embedded data."""
    return embedded_store(tmp_path_factory.mktemp("screen") / "ref.zarr", 0, 80, 40)


def _cfg(**kw):
    return FitConfig(kind="conservative", weights=WS, keep="all", cutoff_angstrom=5.0, width_angstrom=1.0,
                     chunk_frames=20, frame_stride=4, splits=Splits(0.0, 0.7, 0.15, 0.15), **kw)


def test_a_ridge_scan_solves_each_ridge_on_the_same_gram(store):
    rep = fit_store(store, _cfg(ridge=1e-10, ridge_scan=(1e-10, 1e-2)), progress=lambda m: None)
    assert sorted(rep.candidates) == [1e-10, 1e-2] and rep.candidates[1e-10] is rep.model
    # independent: the same fit run at ridge 1e-2 alone (keep = "all": no selection to differ)
    alone = fit_store(store, _cfg(ridge=1e-2), progress=lambda m: None).model
    cand = rep.candidates[1e-2]
    for a, b in zip(cand.A + cand.B, alone.A + alone.B):
        assert_allclose(a, b, rtol=1e-8, atol=1e-10)
    assert cand.metrics["ridge"] == 1e-2 and cand.metrics["selection_ridge"] == 1e-10
    # a ridge penalty can only raise the training error (least squares with a penalty)
    err = {r: m.metrics["relative_rmse"]["quadratic"] for r, m in rep.candidates.items()}
    for sp in ("H", "O"):
        assert err[1e-2][sp]["train"] >= err[1e-10][sp]["train"] > 0.0
    assert not np.allclose(cand.A[0], rep.model.A[0])


def test_the_default_scan_is_the_ridge_and_the_ladder_above_it():
    assert with_ridge_scan(_cfg(ridge=1e-10)).ridge_scan == (1e-10, 1e-8, 1e-6, 1e-5, 1e-4, 1e-3)
    assert with_ridge_scan(_cfg(ridge=2e-6)).ridge_scan == (2e-6, 1e-5, 1e-4, 1e-3)
    given = with_ridge_scan(_cfg(ridge=1e-6, ridge_scan=(1e-4, 1e-7)))
    assert given.ridge == 1e-7 and given.ridge_scan == (1e-4, 1e-7)
    with pytest.raises(ScreenError, match="picoseconds must be a finite number > 0"):
        ScreenSettings(picoseconds=0.0)
    with pytest.raises(ScreenError, match="longer than the run"):
        ScreenSettings(picoseconds=0.1, block_fs=250.0)


def test_the_screen_skips_a_model_that_does_not_hold_the_liquid(store):
    good = fit_store(store, _cfg(ridge=1e-6), progress=lambda m: None).model
    # the same energy upside down: every minimum a maximum, bonds fly apart
    bad = replace(good, A=tuple(-a for a in good.A), B=tuple(-b for b in good.B))
    init = initial_state(f"{store}:60")
    settings = ScreenSettings(picoseconds=0.15, block_fs=50.0)
    messages = []
    chosen, results = screen_candidates({1e-10: bad, 1e-4: good}, init, 300.0, settings, progress=messages.append)
    assert chosen == 1e-4 and [r.passed for r in results] == [False, True]
    assert results[0].reason.split(":")[0].split(" at ")[0] in ("blow-up", "dissociation", "not thermostatted"), \
        results[0].reason
    ok = results[1]
    assert ok.reason is None and len(ok.block_temperatures_K) == 3
    assert all(abs(t - 300.0) < 0.25 * 300.0 for t in ok.block_temperatures_K)
    assert ok.ions_per_water is not None and ok.ions_per_water < 0.05
    assert "screen ridge 1e-10" in messages[0] and "failed" in messages[0] and "passed" in messages[1]
    # nothing passes: no choice, every result says why
    chosen, results = screen_candidates({1e-10: bad}, init, 300.0, settings, progress=lambda m: None)
    assert chosen is None and not results[0].passed and results[0].reason


def test_fit_screens_the_manybody_model_from_the_command_line(store, tmp_path):
    run = [sys.executable, "-m", "ensemble", "fit", str(store), "--kind", "conservative", "--angular",
           "--frame-stride", "8", "--chunk-frames", "5", "--cluster", "local", "--workers", "1"]
    done = subprocess.run(run + ["--screen-ps", "0.1", "--ridge-scan", "1e-10,1e-4", "--out", str(tmp_path / "m.json")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "stability screen: 0.1 ps NVT per candidate from the last training frame at" in done.stderr
    doc = json.loads((tmp_path / "m.json").read_text())["metrics"]["stability_screen"]
    assert doc["passed"] and doc["chosen_ridge"] == 1e-10 and len(doc["candidates"]) == 1
    assert doc["settings"]["steps"] == 200 and 250.0 < doc["candidates"][0]["temperature_K"] < 350.0
    off = subprocess.run(run + ["--no-screen", "--out", str(tmp_path / "n.json")], capture_output=True, text=True,
                         timeout=600)
    assert off.returncode == 0, off.stderr
    assert "stability_screen" not in json.loads((tmp_path / "n.json").read_text())["metrics"]
    assert "stability screen" not in off.stderr
