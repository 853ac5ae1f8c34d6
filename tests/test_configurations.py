"""Configuration sets (extxyz with forces, no velocities): ingest, splits, fitting from several
stores at once, explicit validation / test stores, and `ensemble fit` with them."""

from __future__ import annotations

import json

import dask
import numpy as np
import pytest
from numpy.testing import assert_allclose

from conftest import DATA
from ensemble.cli import main
from ensemble.fit import Splits, accumulate_gram, configuration_splits
from ensemble.fit.pipeline import FitConfig, fit_stores, store_split
from ensemble.invariants import EXPONENTIAL, GAUSSIAN, WeightSet
from ensemble.io import open_trajectory
from ensemble.io.ase import ingest_ase
from ensemble.io.cp2k import IngestError
from ensemble.model import load_model

EXTXYZ = DATA / "water64-dft-5.extxyz"
WS = WeightSet((EXPONENTIAL, GAUSSIAN), (1.0, 2.0))


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    out = tmp_path_factory.mktemp("cfg") / "w64.zarr"
    ingest_ase(EXTXYZ, out)
    return out


def test_extxyz_without_velocities_is_a_configuration_set(configs, tmp_path, capsys):
    import ase.io

    ds = open_trajectory(configs)
    ref = list(ase.io.iread(str(EXTXYZ)))
    assert ds.attrs["configuration_set"] is True and ds.sizes["frame"] == 5
    assert "velocities" not in ds and "temperature" not in ds and "time" not in ds.coords
    assert_allclose(ds["forces"].values[3], ref[3].get_forces(), rtol=0, atol=0)
    assert_allclose(ds["positions"].values[4], ref[4].get_positions(), rtol=0, atol=0)
    assert_allclose(ds["potential_energy"].values, [a.get_potential_energy() for a in ref])
    assert ds["cell"].dims == ("frame", "cell_vector", "xyz")
    assert_allclose(ds["cell"].values[2], np.eye(3) * 12.444661140441895)
    assert ds["forces"].attrs["units"] == "eV/angstrom" and ds["accelerations"].attrs["units"] == "angstrom/fs^2"
    assert main(["info", str(configs), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)         # strict JSON: no time claims, null rather than NaN
    assert info["configuration_set"] is True and info["time_fs"] is None and info["temperature_K"] is None
    assert main(["info", str(configs)]) == 0
    assert "5 independent configurations" in capsys.readouterr().out
    # no time axis to claim: --dt-fs is refused; a file with neither velocities nor forces is refused
    with pytest.raises(IngestError, match="configuration set .*--dt-fs does not apply"):
        ingest_ase(EXTXYZ, tmp_path / "x.zarr", dt_fs=0.5)
    bare = tmp_path / "bare.xyz"
    ase.io.write(str(bare), [ase.Atoms(a.get_chemical_symbols(), a.get_positions(), cell=a.cell, pbc=True)
                             for a in ref[:2]], format="extxyz")
    with pytest.raises(IngestError, match="neither velocities nor forces"):
        ingest_ase(bare, tmp_path / "bare.zarr")
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "bare.zarr").exists()


def test_configuration_sets_are_shuffled_by_seed_time_series_are_not():
    sp = configuration_splits(240, Splits(0.2, 0.6, 0.1, 0.1), seed=0)
    assert [int(np.sum(sp == k)) for k in (0, 1, 2)] == [180, 30, 30]       # discard ignored, rest renormalised
    assert (sp == configuration_splits(240, Splits(0.2, 0.6, 0.1, 0.1), seed=0)).all()
    other = configuration_splits(240, Splits(0.2, 0.6, 0.1, 0.1), seed=1)
    assert not (sp == other).all() and sorted(np.flatnonzero(sp == 1)) != list(range(180, 210))
    ts = type("D", (), {"sizes": {"frame": 10}, "attrs": {}})()
    cs = type("D", (), {"sizes": {"frame": 10}, "attrs": {"configuration_set": True}})()
    cfg = FitConfig(splits=Splits(0.2, 0.6, 0.1, 0.1))
    assert store_split(ts, cfg).tolist() == [-1, -1, 0, 0, 0, 0, 0, 0, 1, 2]       # the paper's, in time
    assert store_split(ts, cfg, own_validation=False, own_test=False).tolist() == [-1, -1] + [0] * 8
    assert sorted(store_split(cs, cfg).tolist()) == [0] * 8 + [1, 2]
    assert store_split(cs, cfg, "validation").tolist() == [1] * 10 and store_split(cs, cfg, "test").tolist() == [2] * 10


def test_gram_matrices_of_several_stores_add(configs, tmp_path):
    """A configuration set and a time series (different boxes, systems and sizes) fitted together:
    the pooled Gram matrices are the sum of each store's."""
    from ensemble.data import load_default
    from ensemble.features import FeatureSpec
    from ensemble.io.store import create_store, write_frames

    ts = load_default().isel(frame=slice(0, 6), atom=slice(0, 96))
    path = tmp_path / "ts.zarr"
    create_store(path, ts.isel(frame=slice(0, 1)), 6, 3)
    write_frames(path, ts, 0)
    cfg = FitConfig(kind="conservative", weights=WS, cutoff_angstrom=4.9, keep="all", chunk_frames=2, prior=False,
                    splits=Splits(0.0, 0.6, 0.2, 0.2))
    spec = FeatureSpec(2, WS, None, "pair", 4.9, 1.0)
    with dask.config.set(scheduler="synchronous"):
        rep = fit_stores([configs, path], cfg, progress=lambda m: None)
        parts = [accumulate_gram(open_trajectory(p).chunk({"frame": 2}), kind="conservative", features=spec,
                                 split=store_split(open_trajectory(p), cfg), species_order=["H", "O"])
                 for p in (configs, path)]
    total = parts[0] + parts[1]
    assert total.rows[:, 0].tolist() == [3 * 128 * 3 + 3 * 64 * 4, 3 * 64 * 3 + 3 * 32 * 4]   # 3 + 4 training frames
    assert_allclose(total.zz, parts[0].zz + parts[1].zz)
    model = rep.model
    assert [s["role"] for s in model.provenance["stores"]] == ["fit", "fit"]
    assert model.metrics["split_rule"][str(configs)] == "configuration set: seeded shuffle"
    assert model.metrics["split_rule"][str(path)] == "time-ordered"
    assert model.metrics["columns"]["rows"] == int(total.rows.sum())


def test_cli_fit_with_validation_and_test_stores(configs, tmp_path, capsys):
    """`ensemble fit A --validation B --test C` on configuration sets, many-body and prior included."""
    import ase.io

    frames = list(ase.io.iread(str(EXTXYZ)))
    for name, sel in (("val", frames[3:4]), ("test", frames[4:5])):
        ase.io.write(str(tmp_path / f"{name}.extxyz"), sel, format="extxyz")
        ingest_ase(tmp_path / f"{name}.extxyz", tmp_path / f"{name}.zarr")
    fit_only = tmp_path / "fit.zarr"
    ase.io.write(str(tmp_path / "fit.extxyz"), frames[:3], format="extxyz")
    ingest_ase(tmp_path / "fit.extxyz", fit_only)
    cfg = tmp_path / "fit.toml"
    cfg.write_text('[fit]\nkind = "conservative"\nweights = [{kind = "exp", param = 1.0}, {kind = "gauss", param = 2.0}]\n'
                   'keep = "all"\nchunk_frames = 2\nangular = "default"\n'
                   '[angular]\nmu_angstrom = [1.0, 2.2]\nsigma_angstrom = [0.4, 0.6]\nl_max = 2\n')
    out = tmp_path / "m.json"
    assert main(["fit", str(fit_only), "--validation", str(tmp_path / "val.zarr"), "--test", str(tmp_path / "test.zarr"),
                 "--config", str(cfg), "--out", str(out), "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "validation" in text and "columns:" in text
    model = load_model(out)
    d = json.loads(out.read_text())          # strict JSON throughout (validation rows exist, all numbers finite)
    assert model.angular is not None and model.angular.mu_angstrom == (1.0, 2.2) and model.prior is not None
    assert [s["role"] for s in d["provenance"]["stores"]] == ["fit", "validation", "test"]
    rm = d["metrics"]["relative_rmse"]["quadratic"]
    assert all(0 < rm[s][k] < 1 for s in ("H", "O") for k in ("train", "validation", "test"))
    # the shortest training distances (3 configurations of liquid water) and the prior's onsets below them
    short = d["prior"]["shortest_training_distance_angstrom"]
    assert 0.85 < short["H-O"] < 1.0 and 1.3 < short["H-H"] < 1.7 and 2.2 < short["O-O"] < 2.8
    assert d["prior"]["onset_angstrom"]["H-O"] == pytest.approx(short["H-O"] - 0.05)
    # the model reproduces its own test error on the test store
    ds = open_trajectory(tmp_path / "test.zarr")
    f = model.forces(ds["positions"].values[0], np.diag(ds["cell"].values[0]), ds["species"].values)
    ref = ds["forces"].values[0]
    for s in ("H", "O"):
        at = ds["species"].values == s
        err = np.sqrt(np.mean((f[at] - ref[at]) ** 2) / np.mean(ref[at] ** 2))
        assert err == pytest.approx(rm[s]["test"], rel=1e-6)
    # stores that disagree on masses are refused with a message naming the store
    assert main(["ingest", str(tmp_path / "val.extxyz"), "--out", str(tmp_path / "heavy.zarr"), "--masses", "H=2.014"]) == 0
    capsys.readouterr()
    assert main(["fit", str(fit_only), str(tmp_path / "heavy.zarr"), "--config", str(cfg), "--workers", "1",
                 "--out", str(tmp_path / "no.json")]) == 2
    assert "species H has mass" in capsys.readouterr().err and not (tmp_path / "no.json").exists()
