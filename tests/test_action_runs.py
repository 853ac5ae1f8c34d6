"""The action integrator in the pipeline: fit from a store (dask Gram), simulate NVE / NVT with
checkpoints and bitwise resume, the command line, diagnostics, and ensemble members."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ensemble.cli import main
from ensemble.diagnostics import _peak, compare_runs, run_diagnostics, vdos_upto
from ensemble.fit.action import fit_action
from ensemble.io.store import open_trajectory
from ensemble.md import initial_state, simulate
from ensemble.md.action import load_action
from ensemble.model import load_model

from conftest import DATA, embedded_store, interrupted_and_resumed

MODEL = DATA / "models" / "conservative-c5.json"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The embedded 128 H2O, 60 frames every 0.5 fs."""
    return embedded_store(tmp_path_factory.mktemp("act") / "ref.zarr", 200, 260, 30)


@pytest.fixture(scope="module")
def fitted(store):
    """A 2 fs action map fitted on the store's pairs (lag 4 frames), synchronous dask."""
    import dask

    with dask.config.set(scheduler="synchronous"):
        return fit_action(store, MODEL, dt_fs=2.0, pair_stride=4, chunk_pairs=4, progress=lambda m: None).action


def test_fit_from_a_store_records_its_model_and_beats_the_midpoint_rule(fitted):
    am = fitted
    assert am.kind == "action" and am.dt_fs == 2.0
    assert am.potential["sha256"] and am.potential["path"].endswith("conservative-c5.json")
    e, b = am.metrics["errors"], am.metrics["baseline_errors"]
    for s in ("H", "O"):
        # the learned terms cut the midpoint rule's position error on the training pairs
        assert e[s]["train"]["rmse_dq"] < 0.8 * b[s]["train"]["rmse_dq"]
        assert b[s]["train"]["relative_dq"] == pytest.approx(1.0)
        assert np.isfinite(e[s]["validation"]["rmse_dv"])


def test_action_model_json_round_trip(fitted, tmp_path):
    fitted.save(tmp_path / "a.json")
    back = load_action(tmp_path / "a.json")
    np.testing.assert_array_equal(back.coef, fitted.coef)
    assert back.features == fitted.features and back.dt_fs == 2.0
    back.check_potential(MODEL)
    other = tmp_path / "other.json"
    other.write_text(MODEL.read_text() + " ")             # another file: another sha256
    with pytest.raises(ValueError, match="sha256"):
        back.check_potential(other)


def test_action_nvt_run_resumes_bitwise(store, fitted, tmp_path):
    model = load_model(MODEL)
    init = initial_state(f"{store}:10")
    kw = dict(steps=16, dt_fs=2.0, temperature_K=300.0, stride=4, checkpoint_every=8, block_frames=2,
              integrator="action", action=fitted, action_options={"tol_angstrom": 1e-10})
    a, b = interrupted_and_resumed(lambda out, **extra: simulate(model, init, out=out, **kw, **extra), tmp_path, 13)
    for name in ("positions", "velocities", "forces", "potential_energy", "thermo_temperature", "thermo_iterations",
                 "thermo_residual"):
        np.testing.assert_array_equal(b[name].values, a[name].values)
    assert a["thermo_iterations"].values.min() >= 1 and a["thermo_residual"].values.max() < 1e-10
    # energies only where frames are written (stride 4): NaN between
    cons = a["thermo_conserved"].values
    assert np.isfinite(cons[3::4]).all() and np.isnan(cons[0::4]).all()
    with pytest.raises(ValueError, match="action_options was .*1e-10.* now .*1e-08"):
        simulate(model, init, out=tmp_path / "b.zarr", resume=True, **{**kw, "action_options": {"tol_angstrom": 1e-8}})


def test_integrator_settings_are_checked(store, fitted, tmp_path):
    model = load_model(MODEL)
    init = initial_state(f"{store}:10")
    with pytest.raises(ValueError, match="fitted for steps of 2 fs"):
        simulate(model, init, steps=2, dt_fs=4.0, integrator="action", action=fitted, out=tmp_path / "x.zarr")
    with pytest.raises(ValueError, match="needs an action model"):
        simulate(model, init, steps=2, dt_fs=2.0, integrator="action", out=tmp_path / "x.zarr")
    with pytest.raises(ValueError, match="breaks the"):
        simulate(model, init, steps=2, dt_fs=2.0, integrator="action", action=fitted, max_force_ev_per_angstrom=10.0,
                 out=tmp_path / "x.zarr")
    assert not (tmp_path / "x.zarr").exists()


def test_midpoint_nve_conserves_energy_and_diagnostics_report_it(store, tmp_path):
    """The implicit midpoint rule at 1 fs for 60 fs: energy drift tiny, T per species reported."""
    model = load_model(MODEL)
    init = initial_state(f"{store}:10")
    simulate(model, init, steps=60, dt_fs=1.0, stride=1, integrator="midpoint", out=tmp_path / "m.zarr",
             action_options={"tol_angstrom": 1e-10})
    d = run_diagnostics(tmp_path / "m.zarr")
    assert d["integrator"] == "midpoint" and d["ensemble"] == "NVE"
    assert abs(d["energy_drift_meV_per_atom_ps"]) < 0.5 and d["energy_fluctuation_meV_per_atom"] < 0.5
    assert set(d["temperature_species_K"]) == {"H", "O"} and 0 <= d["equipartition_gap"] < 1
    assert 1 <= d["iterations_per_step"]["mean"] <= 30


def test_vdos_up_to_nyquist_matches_the_analysis_normalisation(store):
    ds = open_trajectory(store)
    v = vdos_upto(ds, 5000.0, window_fs=10.0)
    k = v["wavenumber"].values
    assert k[-1] <= 5000.0 and v.attrs["nyquist_cm^-1"] == pytest.approx(1 / (2 * 0.5 * 2.99792458e-5))
    np.testing.assert_allclose((v * (k[1] - k[0])).sum("wavenumber").values, 1.0)
    # a pure sine in the velocities peaks at its frequency
    t = ds["time"].values
    fake = ds.assign(velocities=ds["velocities"] * 0 + np.sin(2 * np.pi * 0.1 * t)[:, None, None])
    spec = vdos_upto(fake, 6000.0, window_fs=30.0).sel(species="O")
    peak = _peak(spec.values, spec["wavenumber"].values, (1000.0, 6000.0))
    assert peak == pytest.approx(0.1 / 2.99792458e-5, rel=0.03)


def test_fit_action_and_simulate_commands(store, tmp_path, capsys):
    out = tmp_path / "a.json"
    args = ["fit-action", str(store), "--model", str(MODEL), "--dt-fs", "1.0", "--out", str(out), "--pair-stride", "6",
            "--chunk-pairs", "5", "--workers", "1"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "validation split" in text and f"wrote {out}" in text
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    sim = ["simulate", "--model", str(MODEL), "--init", f"{store}:5", "--steps", "6", "--stride", "2", "--nve",
           "--dt-fs", "1.0", "--integrator", "action", "--action", str(out), "--out", str(tmp_path / "s.zarr")]
    assert main(sim) == 0
    text = capsys.readouterr().out
    assert "6 steps, 4 frames, complete" in text and "fixed-point iterations per step" in text
    assert "energy drift" in text and "|T_H - T_O| / T" in text
    bad = sim[:-1] + [str(tmp_path / "t.zarr")]
    bad[bad.index("--dt-fs") + 1] = "2.0"
    assert main(bad) == 2 and "fitted for steps of 1 fs" in capsys.readouterr().err
    assert main(sim[:sim.index("--action")] + ["--out", str(tmp_path / "u.zarr")]) == 2
    assert "needs --action" in capsys.readouterr().err


def test_fit_action_refuses_bad_inputs_before_a_cluster_starts(store, tmp_path, capsys, monkeypatch):
    import ensemble.cluster

    def no_cluster(*a, **k):
        raise AssertionError("a cluster was started before the inputs were checked")

    monkeypatch.setattr(ensemble.cluster, "open_client", no_cluster)
    out = tmp_path / "a.json"
    base = ["fit-action", str(store), "--model", str(MODEL), "--out", str(out)]
    cases = [
        (["--dt-fs", "0.7"], "dt_fs 0.7 must be a whole number of the store's frame interval (0.5 fs, uniform); "
                             "got 1.4 frames"),
        (["--dt-fs", "1000"], "frames hold 0 pairs 2000 frames apart; need >= 2"),
        (["--dt-fs", "2", "--model", str(DATA / "models" / "agent-paper.json")],
         "agent-paper.json: kind 'agent'; the long-step map needs a conservative model"),
        (["--dt-fs", "2", "--distill-ps", "1", "--distill-stride-fs", "1.5"],
         "--dt-fs 2 must be a whole number of --distill-stride-fs 1.5"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []          # nothing written, no distillation run


def test_direct_predictor_fits_and_runs(store, tmp_path):
    import dask

    with dask.config.set(scheduler="synchronous"):
        am = fit_action(store, MODEL, dt_fs=2.0, kind="direct", pair_stride=4, chunk_pairs=4,
                        progress=lambda m: None).action
    assert am.kind == "direct" and am.coef.size == 2 * (am.features.n_features + 1)
    e, b = am.metrics["errors"], am.metrics["baseline_errors"]
    assert e["H"]["train"]["rmse_dq"] < b["H"]["train"]["rmse_dq"]
    model = load_model(MODEL)
    s = simulate(model, initial_state(f"{store}:10"), steps=10, dt_fs=2.0, stride=5, integrator="direct", action=am,
                 out=tmp_path / "d.zarr")
    assert s.status == "complete"
    ds = open_trajectory(tmp_path / "d.zarr")
    assert "thermo_iterations" not in ds and np.isfinite(ds["thermo_conserved"].values).all()


def test_compare_runs_against_a_verlet_reference(store, tmp_path):
    model = load_model(MODEL)
    init = initial_state(f"{store}:10")
    simulate(model, init, steps=400, dt_fs=0.5, stride=2, out=tmp_path / "v.zarr", write_forces=False)
    simulate(model, init, steps=100, dt_fs=2.0, stride=1, integrator="midpoint", out=tmp_path / "m.zarr",
             write_forces=False, action_options={"energy_every": 10, "tol_angstrom": 1e-8})
    c = compare_runs(tmp_path / "m.zarr", tmp_path / "v.zarr", n_blocks=4, window_fs=50.0)
    assert {"oh_bond_mean", "hoh_angle_mean", "rdf_peak_O-O"} <= set(c["figures"])
    bond = c["figures"]["oh_bond_mean"]
    assert abs(bond["difference"]) < 0.02 and bond["units"] == "angstrom"
    top = c["vdos"]["max_wavenumber_cm^-1"]
    assert top == pytest.approx(1 / (2 * 2.0 * 2.99792458e-5))
    assert set(c["vdos"]["species"]) == {"H", "O"} and "bend_peak_run_cm^-1" in c["vdos"]["species"]["H"]
    assert c["run"]["integrator"] == "midpoint" and c["reference"]["integrator"] == "verlet"
    assert set(c["rdf_area"]) == {"O-O", "O-H", "H-H"}


def test_ensemble_members_take_integrator_and_action(store, fitted, tmp_path):
    from ensemble.runner import load_ensemble, run_member, validate

    fitted.save(tmp_path / "a2.json")
    cfg = tmp_path / "e.toml"
    cfg.write_text(f'[ensemble]\nname = "t"\nreference = "{store}"\n[models]\nm = "{MODEL}"\n'
                   '[defaults]\nsteps = 4\nstride = 2\ninit_frame = 10\n'
                   '[[members]]\nintegrator = "action"\naction = "a2.json"\ndt_fs = 2.0\n'
                   '[[members]]\nintegrator = "midpoint"\ndt_fs = 1.0\n')
    ens = load_ensemble(cfg)
    assert [m.integrator for m in ens.members] == ["action", "midpoint"]
    assert ens.members[0].action == str((tmp_path / "a2.json").resolve())
    validate(ens)
    summary = run_member(ens.members[0], str(tmp_path / "out"))
    assert summary["status"] == "complete"
    ds = open_trajectory(tmp_path / "out" / "members" / f"{ens.members[0].id}.zarr")
    assert json.loads(ds.attrs["simulation_settings"])["integrator"] == "action"
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg.read_text().replace('integrator = "midpoint"', 'integrator = "action"'))
    with pytest.raises(ValueError, match="an action model exactly"):
        load_ensemble(bad)
