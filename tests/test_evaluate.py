"""`ensemble evaluate`: a model's errors on stores, computed from its predictions.

Checked against sums built by hand (a reference made from the model itself plus known
perturbations) and against the fit's own Gram-based errors on its validation / test frames (two
independent computations of the same numbers)."""

import json

import numpy as np
import pytest
from numpy.testing import assert_allclose

from ensemble.cli import main
from ensemble.data import load_default
from ensemble.evaluate import EvaluationError, evaluate_store, fit_split, summarize
from ensemble.fit import FitConfig, Splits, fit_store
from ensemble.fit.gram import configuration_splits
from ensemble.invariants import EXPONENTIAL, GAUSSIAN, POWER, WeightSet
from ensemble.io import open_trajectory
from ensemble.io.store import create_store, write_frames
from ensemble.model import load_model
from ensemble.units import EV_PER_ANGSTROM_AMU_TO_ANGSTROM_PER_FS2

from conftest import DATA

WS3 = WeightSet((EXPONENTIAL, GAUSSIAN, POWER), (1.0, 2.0, 1.0))
C5 = DATA / "models" / "conservative-c5.json"


def _store(path, ds, block):
    n = ds.sizes["frame"]
    create_store(path, ds.isel(frame=slice(0, 1)), n, block)
    for a in range(0, n, block):
        write_frames(path, ds.isel(frame=slice(a, a + block)), a)
    return path


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """16 molecules x 40 frames of the embedded trajectory (a time series)."""
    return _store(tmp_path_factory.mktemp("ev") / "series.zarr",
                  load_default().isel(frame=slice(0, 40), atom=slice(0, 48)), 10)


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """The 5 public DFT configurations (64 H2O, energies and forces), ingested."""
    out = tmp_path_factory.mktemp("ev") / "w64.zarr"
    assert main(["ingest", str(DATA / "water64-dft-5.extxyz"), "--out", str(out)]) == 0
    return out


def test_sums_match_a_reference_built_from_the_model_with_known_errors():
    model = load_model(C5)
    ds0 = load_default().isel(frame=slice(100, 103)).compute()
    box = np.diag(ds0["cell"].values)
    species = [str(s) for s in ds0["species"].values]
    n = len(species)
    pred = [model.force_fn(box, species)(p) for p in ds0["positions"].values]
    ref = np.stack([f for f, _ in pred])
    energy = np.array([e for _, e in pred])
    i_o = species.index("O")
    i_h = species.index("H")
    ref[1, i_o, 0] += 0.3                    # reference = model + known errors
    ref[2, i_h, 1] -= 0.4
    delta = np.array([0.0, 1e-3 * n, -1e-3 * n])   # +-1 meV/atom around a 7 eV offset
    ds = ds0.assign(forces=(ds0["forces"].dims, ref), potential_energy=("frame", energy - 7.0 - delta))
    err = evaluate_store(model, ds.drop_vars("accelerations"), chunk_frames=2)
    assert err.attrs["target"] == "forces" and err["squared_error"].attrs["units"] == "eV^2/Å^2"
    assert_allclose(err["squared_error"].sel(species="O").values, [0, 0.09, 0], atol=1e-20)
    assert_allclose(err["squared_error"].sel(species="H").values, [0, 0, 0.16], atol=1e-20)
    s = summarize(err)
    n_h, n_o = species.count("H"), species.count("O")
    assert s["frames"] == 3 and s["species"]["O"]["components"] == 9 * n_o
    assert_allclose(s["species"]["O"]["force_rmse_eV_per_A"], np.sqrt(0.09 / (9 * n_o)), rtol=1e-12)
    assert_allclose(s["species"]["H"]["force_mae_eV_per_A"], 0.4 / (9 * n_h), rtol=1e-12)
    assert_allclose(s["species"]["O"]["max_atom_error_eV_per_A"], 0.3, rtol=1e-12)
    assert_allclose(s["all"]["max_atom_error_eV_per_A"], 0.4, rtol=1e-12)
    assert [w["frame"] for w in s["worst_frames"]][:2] == [2, 1]
    assert_allclose([w["max_atom_error_eV_per_A"] for w in s["worst_frames"]][:2], [0.4, 0.3], rtol=1e-12)
    at_h = np.array([x == "H" for x in species])
    assert_allclose(s["species"]["H"]["relative_rmse"], np.sqrt(0.16 / np.sum(ref[:, at_h] ** 2)), rtol=1e-12)
    assert_allclose(s["all"]["reference_rms_force_eV_per_A"], np.sqrt(np.mean(ref ** 2)), rtol=1e-12)
    # energies: one offset (model - reference = 7 eV + delta, mean 7), then sqrt(2/3) meV/atom
    assert_allclose(s["energy"]["offset_eV"], [7.0], rtol=1e-12)
    assert_allclose(s["energy"]["rmse_meV_per_atom"], np.sqrt(2 / 3), rtol=1e-9)
    assert_allclose(s["energy"]["mae_meV_per_atom"], 2 / 3, rtol=1e-9)


def test_accelerations_are_compared_as_mass_times_acceleration():
    """An agent model on a store with accelerations only: the same errors as on its forces."""
    model = load_model(DATA / "models" / "agent-paper.json")
    ds = load_default().isel(frame=slice(0, 4), atom=slice(0, 48)).compute()
    a = summarize(evaluate_store(model, ds.drop_vars("forces")))
    f = summarize(evaluate_store(model, ds.drop_vars("accelerations").assign(
        forces=ds["accelerations"] * ds["masses"] / EV_PER_ANGSTROM_AMU_TO_ANGSTROM_PER_FS2)))
    for sp in ("H", "O"):
        assert_allclose(a["species"][sp]["relative_rmse"], f["species"][sp]["relative_rmse"], rtol=1e-6)
    assert "energy" not in a                   # an agent model has no potential energy
    # and the direct numbers: relative RMSE of the accelerations themselves
    pred = np.stack([model.accelerations(p, np.diag(ds["cell"].values), ds["species"].values)
                     for p in ds["positions"].values])
    at = ds["species"].values == "O"
    ref = ds["accelerations"].values
    assert_allclose(a["species"]["O"]["relative_rmse"],
                    np.sqrt(np.sum((pred[:, at] - ref[:, at]) ** 2) / np.sum(ref[:, at] ** 2)), rtol=1e-9)


@pytest.mark.parametrize("kind, stride", [("agent", 1), ("conservative", 2)])
def test_split_errors_equal_the_fits_own(series, kind, stride):
    cfg = FitConfig(kind=kind, weights=WS3, keep=2, chunk_frames=10, splits=Splits(0.1, 0.6, 0.15, 0.15),
                    frame_stride=stride)
    report = fit_store(series, cfg, progress=lambda m: None)
    ds = open_trajectory(series)
    for split in ("train", "validation", "test"):
        index = fit_split(report.model, ds, series, split)
        assert index.size == {"train": 24, "validation": 6, "test": 6}[split] // stride
        assert np.all(index % stride == 0)
        s = summarize(evaluate_store(report.model, ds, path=series, frames=index))
        for sp in ("H", "O"):
            assert_allclose(s["species"][sp]["relative_rmse"], report.table["quadratic"][sp][split], rtol=1e-6)


def test_split_of_a_configuration_set_is_the_fits_shuffle(configs, tmp_path):
    cfg = FitConfig(kind="conservative", weights=WS3, keep=3, cutoff_angstrom=5.0,
                    chunk_frames=2, splits=Splits(0.0, 0.6, 0.2, 0.2), split_seed=3)
    report = fit_store(configs, cfg, progress=lambda m: None)
    ds = open_trajectory(configs)
    lab = configuration_splits(5, Splits(0.0, 0.6, 0.2, 0.2), 3)
    index = fit_split(report.model, ds, configs, "test")
    assert index.tolist() == np.flatnonzero(lab == 2).tolist() and index.size == 1
    s = summarize(evaluate_store(report.model, ds, path=configs, frames=index))
    assert_allclose(s["species"]["O"]["relative_rmse"], report.table["quadratic"]["O"]["test"], rtol=1e-6)
    # a copy of the store elsewhere is recognised by its source files and frame count
    copy = _store(tmp_path / "copy.zarr", ds.compute(), 5)
    assert fit_split(report.model, open_trajectory(copy), copy, "test").tolist() == index.tolist()
    other = _store(tmp_path / "other.zarr", load_default().isel(frame=slice(0, 5)), 5)
    with pytest.raises(EvaluationError, match="not a store this model was fitted on"):
        fit_split(report.model, open_trajectory(other), other, "test")
    # the command line takes the extxyz itself (ingested to a scratch store) and finds the same split
    report.model.save(tmp_path / "m.json")
    out = tmp_path / "ev.json"
    xyz = DATA / "water64-dft-5.extxyz"
    assert main(["evaluate", str(tmp_path / "m.json"), str(xyz), "--split", "test", "--out", str(out),
                 "--workers", "1"]) == 0
    d = json.loads(out.read_text())["stores"][0]
    assert d["frame_indices"] == index.tolist() and d["path"] == str(xyz.resolve())
    assert_allclose(d["species"]["O"]["relative_rmse"], s["species"]["O"]["relative_rmse"], rtol=1e-12)
    assert "energy" not in d and "energy" not in s     # one frame: an offset, but no spread to report


def test_cli_evaluates_writes_json_and_reports_energy(configs, tmp_path, capsys):
    out = tmp_path / "ev.json"
    assert main(["evaluate", str(C5), str(configs), f"{configs}:1:4", "--out", str(out), "--workers", "1"]) == 0
    text = capsys.readouterr().out
    d = json.loads(out.read_text())
    assert d["format"] == "ensemble.evaluation/1" and d["kind"] == "conservative" and len(d["stores"]) == 2
    assert d["stores"][1]["frame_indices"] == [1, 2, 3] and d["stores"][0]["frames"] == 5
    assert d["all"]["frames"] == 8
    # the SPC/Fw model on DFT water: forces wrong by a large fraction, energies by meV/atom
    rel = d["stores"][0]["species"]["H"]["relative_rmse"]
    assert 0.2 < rel < 2.0 and f"{rel:.4f}" in text
    assert d["stores"][0]["energy"]["frames"] == 5 and d["stores"][0]["energy"]["rmse_meV_per_atom"] > 0
    assert "energy: RMSE" in text and "all stores: 8 frames" in text
    # an existing --out is kept unless --overwrite
    before = out.read_text()
    assert main(["evaluate", str(C5), str(configs), "--out", str(out)]) == 2
    assert out.read_text() == before and "already exists" in capsys.readouterr().err


def test_cli_refuses_bad_inputs_before_anything_runs(configs, series, tmp_path, capsys):
    out = tmp_path / "ev.json"
    # species the model does not know
    ds = load_default().isel(frame=slice(0, 2), atom=slice(0, 48)).compute()
    sp = ds["species"].values.astype(object)
    sp[0] = "N"
    foreign = _store(tmp_path / "n.zarr", ds.assign_coords(species=("atom", sp)), 2)
    cases = [
        ([str(C5), str(foreign)], "species ['N'] are not in the model's species"),
        ([str(C5), str(configs), "--split", "test"], "no fit stores or splits"),
        ([str(C5), f"{configs}:0:2", "--split", "test"], "give a frame range or --split, not both"),
        ([str(C5), f"{configs}:4:4"], "selects no frame"),
        ([str(C5), str(tmp_path / "missing.zarr")], "no such store"),
    ]
    for argv, message in cases:
        assert main(["evaluate", *argv, "--out", str(out)]) == 2, argv
        assert message in capsys.readouterr().err, argv
        assert not out.exists()
    # masses that differ from the model's
    heavy = _store(tmp_path / "heavy.zarr", ds.assign(masses=ds["masses"] * 2.0), 2)
    assert main(["evaluate", str(C5), str(heavy)]) == 2
    assert "has mass 31.9988 amu, the model's O 15.9994 amu" in capsys.readouterr().err


def test_non_finite_reference_frame_is_named(tmp_path):
    ds = load_default().isel(frame=slice(0, 4), atom=slice(0, 48)).compute()
    f = ds["forces"].values.copy()
    f[2, 5, 1] = np.nan
    bad = ds.assign(forces=(ds["forces"].dims, f))
    with pytest.raises(EvaluationError, match="frame 2 has non-finite positions or forces"):
        evaluate_store(load_model(C5), bad)
