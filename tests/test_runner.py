"""Ensemble runner: config expansion and refusals; a real multi-process dask cluster (scheduler +
two workers started here) with a worker killed mid-run, results equal to a serial run, rerun
skipping, and a member that fails without stopping the others."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from conftest import DATA
from ensemble.runner import EnsembleError, Member, load_ensemble, run_ensemble

MODELS = DATA / "models"


def write_config(tmp_path: Path, body: str, name="ens.toml") -> Path:
    p = tmp_path / name
    p.write_text(f"""[ensemble]
name = "test"
reference = "{tmp_path / 'ref.zarr'}"

[models]
conservative = "{MODELS / 'conservative-c5.json'}"
agent = "{MODELS / 'agent-paper.json'}"
""" + body)
    return p


@pytest.fixture(scope="module")
def ref_store(tmp_path_factory):
    from ensemble.data import write_default_store
    d = tmp_path_factory.mktemp("ref")
    write_default_store(d / "ref.zarr")
    return d


def test_config_expands_to_members_with_explicit_seeds_and_stable_ids(tmp_path):
    cfg = write_config(tmp_path, """
[defaults]
steps = 200
[grid]
temperature_K = [280, 320]
seed = [1, 2]
[[members]]
model = "agent"
seed = 5
max_force_ev_per_angstrom = 5.98
""")
    ens = load_ensemble(cfg)
    assert len(ens.members) == 5
    assert [(m.model, m.temperature_K, m.seed) for m in ens.members] == [
        ("conservative", 280.0, 1), ("conservative", 280.0, 2), ("conservative", 320.0, 1), ("conservative", 320.0, 2),
        ("agent", 300.0, 5)]
    assert ens.members[4].max_force_ev_per_angstrom == 5.98 and ens.members[0].steps == 200
    assert ens.members[0].id.startswith("conservative-T280-x1-s1-")
    assert [m.id for m in load_ensemble(cfg).members] == [m.id for m in ens.members]     # stable
    assert len({m.id for m in ens.members}) == 5


@pytest.mark.parametrize("body, message", [
    ("[defaults]\nsteps = 'many'\n", "steps = 'many' should be int"),
    ("[defaults]\nspeed = 3\n", "unknown setting 'speed'"),
    ("[grid]\nseed = 3\n", "seed must be a non-empty list"),
    ("[defaults]\nmodel = 'nope'\n", "model 'nope' is not in [models]"),
    ("[defaults]\nthermostat = 'berendsen'\n", "thermostat 'berendsen'"),
    ("[[members]]\nseed = 1\n[[members]]\nseed = 1\n", "listed twice"),
])
def test_bad_configs_name_the_file_and_field(tmp_path, body, message):
    with pytest.raises(EnsembleError, match=message.replace("[", r"\[").replace("(", r"\(")) as err:
        load_ensemble(write_config(tmp_path, body))
    assert "ens.toml" in str(err.value)


def test_a_paper_mode_model_is_refused_on_a_tiled_box_before_anything_runs(tmp_path, ref_store):
    cfg = write_config(ref_store, """
[[members]]
model = "agent"
tile = 2
""", name="tiled.toml")
    ens = load_ensemble(cfg)
    with pytest.raises(EnsembleError, match="paper mode .* do not transfer"):
        run_ensemble(ens, tmp_path / "out", client=None)
    assert not (tmp_path / "out").exists()
    # the cutoff model (5 Å <= half of the 15.6 Å training box) transfers
    from ensemble.model import load_model
    from ensemble.runner import check_transfer
    check_transfer(load_model(MODELS / "conservative-c5.json"), Member("c", "", "", tile=2), np.full(3, 15.64))


def _start(cmd, env, log):
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_distributed_run_survives_a_killed_worker_and_equals_a_serial_run(tmp_path, ref_store):
    cfg = write_config(ref_store, """
[defaults]
steps = 800
stride = 4
[grid]
temperature_K = [290, 310]
seed = [1, 2]
[[members]]
seed = 9
temperature_K = 100000.0
""", name="cluster.toml")
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               NUMBA_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    sched_file = tmp_path / "scheduler.json"
    bindir = Path(sys.executable).parent
    log = open(tmp_path / "cluster.log", "w")
    procs = [_start([str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                     "--scheduler-file", str(sched_file)], env, log)]
    try:
        for _ in range(300):
            if sched_file.exists() and sched_file.stat().st_size > 0:
                break
            time.sleep(0.1)
        address = json.loads(sched_file.read_text())["address"]
        for _ in range(2):
            procs.append(_start([str(bindir / "dask"), "worker", address, "--nthreads", "1", "--no-nanny",
                                 "--no-dashboard", "--host", "127.0.0.1"], env, log))
        out = tmp_path / "out"
        run = subprocess.Popen([sys.executable, "-m", "ensemble.cli", "run", str(cfg), "--out", str(out),
                                "--scheduler", address], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        # kill a worker while both are inside a member: two members' stores being written
        # (members/.<id>.zarr.running, there from a member's first frame to its last; the
        # .partial-* copies live only while a store is created, too short a window to aim at)
        killed = False
        deadline = time.time() + 240
        while run.poll() is None and time.time() < deadline:
            running = list((out / "members").glob(".*.zarr.running")) if (out / "members").exists() else []
            if len(running) >= 2 and not killed:
                os.kill(procs[1].pid, signal.SIGKILL)
                killed = True
            time.sleep(0.05)
        stdout, stderr = run.communicate(timeout=240)
        assert run.returncode == 0, stderr
        assert killed, "no moment with two members running: the worker was never killed"
        summaries = {p.stem: json.loads(p.read_text()) for p in (out / "members").glob("*.json")}
        status = sorted(s["status"] for s in summaries.values())
        assert status == ["complete"] * 4 + ["failed"], status
        failed = next(s for s in summaries.values() if s["status"] == "failed")
        assert "runaway heating" in failed["error"] and "conservative-T100000" in stderr
        assert "4 of 5 members complete" in stdout
        assert not list((out / "members").glob(".*partial*")) and not list((out / "members").glob(".*.running"))

        # a serial run of the same members (one local worker) gives bitwise the same trajectories
        serial = tmp_path / "serial"
        done = subprocess.run([sys.executable, "-m", "ensemble.cli", "run", str(cfg), "--out", str(serial),
                               "--workers", "1"], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        for m in load_ensemble(cfg).members:
            a = xr.open_zarr(out / "members" / f"{m.id}.zarr", consolidated=False)
            b = xr.open_zarr(serial / "members" / f"{m.id}.zarr", consolidated=False)
            assert a.sizes["frame"] == b.sizes["frame"] and (m.temperature_K > 1e4 or a.sizes["frame"] == 201)
            np.testing.assert_array_equal(a["positions"].values, b["positions"].values)
            np.testing.assert_array_equal(a["velocities"].values, b["velocities"].values)

        # the aggregate: one member dimension, groups by temperature, the failure recorded
        agg = xr.open_zarr(out / "aggregate.zarr", consolidated=False)
        assert agg.sizes["member"] == 5 and agg["oh_bond_mean"].attrs["units"] == "angstrom"
        doc = json.loads((out / "summary.json").read_text())
        groups = {(g["temperature_K"], g["members"]) for g in doc["groups"]}
        assert groups == {(290.0, 2), (310.0, 2), (100000.0, 1)}
        g290 = next(g for g in doc["groups"] if g["temperature_K"] == 290.0)
        assert 270 < g290["temperature"] < 310 and g290["temperature_err"] > 0 and g290["failed"] == 0
        assert 1.0 < g290["oh_bond_mean"] < 1.06
        # ions, hop rate and the criterion that failed are carried into the aggregate and summary.md
        hot = next(g for g in doc["groups"] if g["temperature_K"] == 100000.0)
        assert hot["failed"] == 1 and hot["failed_criteria"] == {"blow_up": 1}
        assert g290["n_hydronium"] is not None and g290["proton_transfer_rate"] is not None
        assert set(agg["failed_criterion"].values.tolist()) == {"", "blow_up"} and "n_hydronium_series" in agg
        md = (out / "summary.md").read_text()
        assert "H3O+ per frame" in md and "hops (1/molecule/ps)" in md and "(blow-up x1)" in md

        # a rerun skips every finished member (complete, or failed in its own dynamics)
        before = {p.name: p.stat().st_mtime_ns for p in (out / "members").glob("*.zarr")}
        again = subprocess.run([sys.executable, "-m", "ensemble.cli", "run", str(cfg), "--out", str(out),
                                "--scheduler", address], env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
        assert "5 done (5 skipped)" in again.stderr
        assert before == {p.name: p.stat().st_mtime_ns for p in (out / "members").glob("*.zarr")}
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        log.close()


def test_shipped_ensemble_configs_expand():
    from ensemble.runner import Ensemble
    root = Path(__file__).resolve().parents[1]
    study = load_ensemble(root / "configs" / "ensemble" / "study.toml")
    assert isinstance(study, Ensemble) and len(study.members) == 60 and study.reference == "embedded"
    demo = load_ensemble(root / "ensemble" / "data" / "demo-ensemble.toml")
    assert len(demo.members) == 10 and {m.tile for m in demo.members} == {1, 2}
    assert sum(m.model == "agent" for m in demo.members) == 2


def test_run_command_refuses_a_non_transferable_member_before_writing_anything(tmp_path, capsys):
    from ensemble.cli import main
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f"""[ensemble]
reference = "embedded"
[models]
agent = "{MODELS / 'agent-paper.json'}"
[grid]
tile = [1, 2]
""")
    assert main(["run", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: member agent-T300-x2-s0-") and "paper mode" in err
    assert not (tmp_path / "out").exists()


def test_an_interrupted_member_continues_from_its_checkpoint_bitwise(tmp_path, ref_store):
    """A member whose process is killed mid-run continues from its last checkpoint when it runs
    again (not from step 0); the store never appears under its final name half-written, and the
    trajectory equals an uninterrupted run's bit for bit."""
    from dataclasses import asdict

    import zarr

    from ensemble.runner import run_member

    m = Member("conservative", str(MODELS / "conservative-c5.json"), str(ref_store / "ref.zarr"), steps=1200,
               stride=4, temperature_K=300.0, seed=3)
    out = tmp_path / "out"
    running = out / "members" / f".{m.id}.zarr.running"
    code = ("import json, sys; from ensemble.runner import Member, run_member; "
            "run_member(Member(**json.loads(sys.argv[1])), sys.argv[2], 100.0, 100)")
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(asdict(m)), str(out)], env=env)
    step = 0
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                step = int(zarr.open_group(running / "checkpoint", mode="r").attrs["step"])
            except Exception:
                step = 0
            if step >= 300:
                proc.kill()
                break
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    assert step >= 300, "the member finished (or never checkpointed) before it could be interrupted"
    assert running.exists() and not (out / "members" / f"{m.id}.zarr").exists()   # nothing under the final name

    summary = run_member(m, str(out), 100.0, 100)
    assert summary["status"] == "complete" and summary["steps_done"] == 1200
    assert summary["resumed_from_step"] >= 300 and summary["resumed_from_step"] % 100 == 0
    assert not running.exists()
    store = out / "members" / f"{m.id}.zarr"
    assert zarr.open_group(store, mode="r").attrs["resumed_from_steps"] == [summary["resumed_from_step"]]

    serial = run_member(m, str(tmp_path / "serial"), 100.0, 1000)          # uninterrupted, other checkpoints
    assert serial["resumed_from_step"] is None
    a = xr.open_zarr(store, consolidated=False)
    b = xr.open_zarr(tmp_path / "serial" / "members" / f"{m.id}.zarr", consolidated=False)
    assert a.sizes["frame"] == b.sizes["frame"] == 301 and a.sizes["md_step"] == b.sizes["md_step"] == 1200
    for name in ("positions", "velocities", "thermo_conserved", "step"):
        np.testing.assert_array_equal(a[name].values, b[name].values)

    # a member simulated to the end whose worker died before its summary: analysed, not rerun, and
    # its summary still says where the simulation continued from (a batch job that only analyses)
    (out / "members" / f"{m.id}.json").unlink()
    mtime = store.stat().st_mtime_ns
    again = run_member(m, str(out), 100.0, 100)
    assert again["status"] == "complete" and store.stat().st_mtime_ns == mtime
    assert again["resumed_from_step"] == summary["resumed_from_step"]
    (tmp_path / "serial" / "members" / f"{m.id}.json").unlink()
    assert run_member(m, str(tmp_path / "serial"), 100.0, 1000)["resumed_from_step"] is None
