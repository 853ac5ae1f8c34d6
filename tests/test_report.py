"""Scorecard and report: exact differences for a known perturbation, Wasserstein distance of a
scaled sample, the CLI end to end (analyze -> report) and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from numpy.testing import assert_allclose

from conftest import leftovers
from ensemble.analysis import analyze
from ensemble.cli import main
from ensemble.data import load_default, write_default_store
from ensemble.report import compare, format_scorecard, spectrum_distance, wasserstein1


@pytest.fixture(scope="module")
def ref_stats():
    return analyze(load_default().isel(frame=slice(0, 400)), window_fs=100.0).compute()


def test_identical_runs_score_zero_and_a_stretched_bond_is_found(ref_stats):
    same = compare(ref_stats, ref_stats)
    rows = {r["quantity"]: r for r in same["rows"]}
    assert all(r["difference"] == 0.0 for r in same["rows"])
    assert same["distances"]["oh_bond_wasserstein1_angstrom"] == 0.0
    assert same["distances"]["rdf_area_O-O_angstrom"] == pytest.approx(0.0, abs=1e-9)   # float32 g(r)
    assert not same["stability"]["failed"]
    assert 1.02 < rows["O-H bond mean"]["reference"] < 1.04 and rows["O-H bond mean"]["reference_err"] > 0
    assert {"temperature H", "temperature O", "O-H stretch peak (bond spectrum)", "H bend peak (VDOS)",
            "g(r) O-O peak position"} <= set(rows)

    stretched = ref_stats.copy(deep=True)
    for v in ("oh_bond", "oh_bond_mean", "oh_bond_std"):
        stretched[v] = ref_stats[v] * 1.05
    card = compare(ref_stats, stretched)
    rows = {r["quantity"]: r for r in card["rows"]}
    mean = float(ref_stats["oh_bond_mean"].mean())
    assert_allclose(rows["O-H bond mean"]["difference"], 0.05 * mean, rtol=1e-12)
    assert rows["O-H bond mean"]["z"] > 3 and rows["temperature"]["difference"] == 0.0
    # W1 between X and 1.05 X is 0.05 E[X] (quantile functions scale)
    assert_allclose(card["distances"]["oh_bond_wasserstein1_angstrom"], 0.05 * float(ref_stats["oh_bond"].mean()),
                    rtol=1e-3)
    md = format_scorecard({"stretched": card})
    assert "| O-H bond mean | Å |" in md and "**!**" in md
    # the spectral peaks carry their resolution (1 / 100 fs windows), so a 83 cm^-1 grid is not read as precision
    peak = next(r for r in card["rows"] if r["key"] == "oh_stretch_peak")
    assert "resolution 334 cm^-1 (100 fs windows), grid 83 cm^-1" == peak["note"]
    assert "| O-H stretch peak (bond spectrum) | cm^-1 |" in md and "resolution 334 cm^-1" in md
    # reactive-water rows: ions per frame and the proton-transfer rate with its Poisson error
    hops = next(r for r in card["rows"] if r["key"] == "proton_transfer_rate")
    assert hops["reference"] == 0.0 and hops["reference_err"] > 0 and "0 events" in hops["note"]
    assert {"H3O+ per frame", "OH- per frame", "H-O-H angle from the first g_HH and g_OH peaks"} <= set(rows)


def test_distances_on_known_cases():
    rng = np.random.default_rng(0)
    x = rng.normal(size=20000)
    assert_allclose(wasserstein1(x, x + 0.3), 0.3, rtol=1e-9)       # a shift moves every quantile by 0.3
    import xarray as xr
    k = np.linspace(0, 5000, 501)
    p = xr.DataArray(np.exp(-((k - 1500) / 50) ** 2), dims="wavenumber", coords={"wavenumber": k})
    q = xr.DataArray(np.exp(-((k - 3500) / 50) ** 2), dims="wavenumber", coords={"wavenumber": k})
    assert spectrum_distance(p, 3 * p) == pytest.approx(0.0, abs=1e-12)   # shape only
    assert spectrum_distance(p, q) == pytest.approx(1.0, abs=1e-6)         # disjoint


def test_analyze_and_report_from_the_command_line(tmp_path, capsys):
    store = tmp_path / "ref.zarr"
    write_default_store(store)
    assert main(["analyze", str(store), "--out", str(tmp_path / "a.zarr"), "--frames", "0:400"]) == 0
    assert main(["analyze", str(store), "--out", str(tmp_path / "b.zarr"), "--frames", "400:800"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["frames"] == 400 and 3400 < summary["oh_stretch_peak_cm^-1"] < 3800
    assert main(["report", str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr"), "--out", str(tmp_path / "rep")]) == 0
    # frame ranges straight from the trajectory store: the same comparison without a separate analyze
    assert main(["report", f"{store}:0:400", f"{store}:400:800", "--out", str(tmp_path / "rep2")]) == 0
    doc2 = json.loads((tmp_path / "rep2" / "scorecard.json").read_text())
    assert list(doc2["models"]) == ["ref[400:800]"]
    # names for the scorecard and legends instead of store names; one per model, distinct
    assert main(["report", str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr"), "--label", "second half",
                 "--out", str(tmp_path / "rep3")]) == 0
    assert list(json.loads((tmp_path / "rep3" / "scorecard.json").read_text())["models"]) == ["second half"]
    assert "## second half" in (tmp_path / "rep3" / "scorecard.md").read_text()
    assert main(["report", str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr"), "--label", "x", "--label", "y",
                 "--out", str(tmp_path / "rep4")]) == 2
    assert "expected 1 distinct labels" in capsys.readouterr().err and not (tmp_path / "rep4").exists()
    via_stats = {r["key"]: r for r in json.loads((tmp_path / "rep" / "scorecard.json").read_text())["models"]["b"]["rows"]}
    for r in doc2["models"]["ref[400:800]"]["rows"]:
        assert r["difference"] == pytest.approx(via_stats[r["key"]]["difference"], rel=1e-9, abs=1e-12), r["key"]
    doc = json.loads((tmp_path / "rep" / "scorecard.json").read_text())
    rows = {r["quantity"]: r for r in doc["models"]["b"]["rows"]}
    # two halves of one equilibrium run: the same liquid within its own noise
    assert abs(rows["O-H bond mean"]["difference"]) < 0.002 and abs(rows["H-O-H angle mean"]["difference"]) < 0.5
    assert abs(rows["O-H stretch peak (bond spectrum)"]["difference"]) < 30
    for f in ("fig1_reference_kinetic_energy.png", "fig3_temperature.png", "fig4_oh_bond.png",
              "fig5_oh_bond_samples.png", "fig6_oh_spectrum.png", "fig7_hoh_angle.png", "rdf.png", "vdos.png"):
        assert (tmp_path / "rep" / f).stat().st_size > 10_000, f
    assert "| temperature |" in (tmp_path / "rep" / "scorecard.md").read_text()
    capsys.readouterr()
    # refusals: a missing model, an existing report directory; nothing half-written
    assert main(["report", str(tmp_path / "a.zarr"), str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "r2")]) == 2
    assert "missing.zarr: no such store" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr"), "--out", str(tmp_path / "rep")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["analyze", str(store), "--out", str(tmp_path / "c.zarr"), "--frames", "0:1"]) == 2
    assert "selects 1 of 1001 frames" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists() and not (tmp_path / "c.zarr").exists() and leftovers(tmp_path) == []
