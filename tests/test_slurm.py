"""Ensembles and fits on a real SLURM cluster through dask-jobqueue (marked ``cluster``).

The fixture starts a one-node SLURM on this machine (Debian's slurm-wlm and munge: munged as
the munge user, slurmctld and slurmd in the foreground as children of the test), with its
config, state, spool and logs in a temporary directory, and stops and removes all of it at the
end. Tests skip, saying why, where it cannot start (not root, packages missing, no
dask-jobqueue). ``.ci/run`` installs the packages and runs ``pytest -m cluster``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from conftest import DATA

pytestmark = pytest.mark.cluster

MODELS = DATA / "models"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Slurm:
    """A running one-node SLURM: ``env`` points its clients at the temporary config."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                        NUMBA_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                        # a lost worker's job is replaced after 2 s instead of dask's 15 s
                        DASK_DISTRIBUTED__DEPLOY__LOST_WORKER_TIMEOUT="2s")
        self.procs: list[subprocess.Popen] = []

    def run(self, *cmd: str, check: bool = True) -> str:
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
        return done.stdout

    def jobs(self) -> dict[str, str]:
        """Job id -> state of this cluster's jobs still known to SLURM."""
        out = self.run("squeue", "-h", "-o", "%i %T", check=False)
        return dict(line.split() for line in out.splitlines() if line.strip())

    munge: Path | None = None

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted((self.root / "log").glob("*.log")))


def _start_slurm(root: Path) -> Slurm:
    cluster = Slurm(root)
    try:
        return _start_daemons(cluster)
    except BaseException:
        _stop_slurm(cluster)
        raise


def _start_daemons(cluster: Slurm) -> Slurm:
    import pwd

    root = cluster.root
    host = socket.gethostname().split(".")[0]
    for d in ("state", "spool", "log"):
        (root / d).mkdir()
    # munged runs as the munge user, who must reach its socket: a directory of its own under /tmp
    # (pytest's temporary directories are private to root); a fresh key, not the system's
    munge = cluster.munge = Path(tempfile.mkdtemp(prefix="ensemble-munge-"))
    uid, gid = pwd.getpwnam("munge").pw_uid, pwd.getpwnam("munge").pw_gid
    (munge / "munge.key").write_bytes(os.urandom(1024))
    for p in (munge, munge / "munge.key"):
        os.chown(p, uid, gid)
    os.chmod(munge, 0o711)
    os.chmod(munge / "munge.key", 0o600)
    sock = munge / "munge.socket"
    with open(root / "log" / "munged.log", "w") as log:
        cluster.procs.append(subprocess.Popen(
            ["runuser", "-u", "munge", "--", "munged", "--foreground", f"--socket={sock}",
             f"--key-file={munge / 'munge.key'}", f"--pid-file={munge / 'munged.pid'}",
             f"--seed-file={munge / 'munged.seed'}", f"--log-file={munge / 'munged.file.log'}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    for _ in range(200):
        if sock.exists() or cluster.procs[0].poll() is not None:
            break
        time.sleep(0.05)
    if not sock.exists():
        raise RuntimeError(f"munged did not start\n{cluster.logs()}")
    node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True).stdout.splitlines()[0]
    node = " ".join(f for f in node.split() if not f.startswith("NodeName="))
    cluster.conf.write_text(f"""ClusterName=ensembletest
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
KillWait=2
MinJobAge=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={host} {node} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    for daemon in ("slurmctld", "slurmd"):
        cmd = [daemon, "-D", "-f", str(cluster.conf)] + (["-c", "-i"] if daemon == "slurmctld" else [])
        cluster.procs.append(subprocess.Popen(cmd, env=cluster.env, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.time() + 60
    while time.time() < deadline:
        state = cluster.run("sinfo", "-h", "-o", "%T", check=False).strip()
        if state in ("idle", "mixed", "allocated"):
            return cluster
        if any(p.poll() is not None for p in cluster.procs):
            break
        time.sleep(0.5)
    state = cluster.run("sinfo", "-h", "-o", "%T", check=False).strip()
    raise RuntimeError(f"SLURM did not come up (node state {state!r})\n{cluster.logs()}")


def _stop_slurm(cluster: Slurm) -> None:
    cluster.run("scancel", "--full", "-u", "root", check=False) if cluster.conf.exists() else None
    for p in reversed(cluster.procs):
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in reversed(cluster.procs):
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if getattr(cluster, "munge", None) is not None:
        shutil.rmtree(cluster.munge, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd and munged (as the munge user) needs root")
    pytest.importorskip("dask_jobqueue", reason="pip install 'ensemble[cluster]' (dask-jobqueue)")
    root = tmp_path_factory.mktemp("slurm")
    try:
        cluster = _start_slurm(root)
    except (RuntimeError, KeyError, OSError, IndexError) as exc:
        pytest.skip(f"SLURM could not start here: {exc}")
    try:
        yield cluster
    finally:
        _stop_slurm(cluster)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def ref_store(tmp_path_factory):
    from ensemble.data import write_default_store
    d = tmp_path_factory.mktemp("ref")
    write_default_store(d / "ref.zarr")
    return d / "ref.zarr"


def _config(path: Path, ref: Path, body: str) -> Path:
    path.write_text(f"""[ensemble]
name = "slurm-test"
reference = "{ref}"
{body}""".replace("[models]", f"[models]\nconservative = \"{MODELS / 'conservative-c5.json'}\"", 1))
    return path


def _ensemble(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ensemble", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _checkpoint_steps(members: Path) -> dict[str, int]:
    """Member id -> step of the last checkpoint of each in-progress store."""
    import zarr

    steps = {}
    for p in members.glob(".*.zarr.running") if members.exists() else ():
        try:
            steps[p.name[1:-len(".zarr.running")]] = int(zarr.open_group(p / "checkpoint", mode="r").attrs["step"])
        except Exception:       # not written yet
            pass
    return steps


def _assert_bitwise(a_dir: Path, b_dir: Path, ids) -> None:
    for mid in ids:
        a = xr.open_zarr(a_dir / "members" / f"{mid}.zarr", consolidated=False)
        b = xr.open_zarr(b_dir / "members" / f"{mid}.zarr", consolidated=False)
        assert a.sizes == b.sizes
        for name in ("positions", "velocities", "thermo_conserved"):
            np.testing.assert_array_equal(a[name].values, b[name].values)


def test_adaptive_slurm_ensemble_survives_a_cancelled_job_and_equals_a_serial_run(slurm, ref_store, tmp_path):
    cfg = _config(tmp_path / "ens.toml", ref_store, f"""checkpoint_every = 200

[models]

[defaults]
steps = 1600
stride = 8

[grid]
temperature_K = [290.0, 310.0]
seed = [1, 2]

[cluster]
kind = "slurm"
minimum_jobs = 0
maximum_jobs = 2
cores = 1
memory = "1500MB"
walltime = "00:10:00"
log_directory = "{tmp_path / 'logs'}"
""")
    assert slurm.jobs() == {}                                   # adaptive: nothing before there is work
    out = tmp_path / "out"
    run = _ensemble("run", str(cfg), "--out", str(out), env=slurm.env)
    seen: dict[str, str] = {}
    cancelled = None
    deadline = time.time() + 400
    while run.poll() is None and time.time() < deadline:
        jobs = slurm.jobs()
        seen.update(jobs)
        running = [j for j, state in jobs.items() if state == "RUNNING"]
        # cancel one job while both workers are inside members, both past their first checkpoint
        steps = _checkpoint_steps(out / "members")
        if cancelled is None and len(running) == 2 and len(steps) == 2 and min(steps.values()) >= 200:
            cancelled = running[0]
            slurm.run("scancel", cancelled)
        time.sleep(0.2)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 0, stderr + slurm.logs()
    assert "adaptive 0-2 jobs" in stderr and "dashboard http://127.0.0.1:" in stderr
    assert cancelled is not None, f"never saw two running jobs with members in progress: {seen}\n{stderr}"
    assert 2 <= len(seen) and "4 of 4 members complete" in stdout
    summaries = [json.loads(p.read_text()) for p in (out / "members").glob("*.json")]
    assert sorted(s["status"] for s in summaries) == ["complete"] * 4
    jobs_used = {s["batch_job"] for s in summaries}
    assert jobs_used <= set(seen) and "" not in jobs_used            # every member ran in a SLURM job
    assert cancelled not in jobs_used                                 # ... and none finished in the cancelled one
    resumed = [s for s in summaries if s["resumed_from_step"]]
    assert resumed and all(s["resumed_from_step"] >= 200 for s in resumed), summaries
    assert f"continued from its checkpoint at step {resumed[0]['resumed_from_step']}" in stderr
    assert not list((out / "members").glob(".*"))                    # no in-progress store, lock or partial left
    for _ in range(50):                                              # the cluster closed: its jobs are cancelled
        if not slurm.jobs():
            break
        time.sleep(0.2)
    assert slurm.jobs() == {}

    serial = tmp_path / "serial"
    done = subprocess.run([sys.executable, "-m", "ensemble", "run", str(cfg), "--out", str(serial), "--cluster",
                           "local", "--workers", "1"], env=slurm.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _assert_bitwise(out, serial, [s["id"] for s in summaries])


def _steps_per_s(ref_store: Path, tile: int = 1) -> float:
    """MD steps per second of one member on this machine now (to size a run that outlasts a walltime)."""
    from ensemble.md import initial_state, simulate
    from ensemble.model import load_model

    model = load_model(MODELS / "conservative-c5.json")
    init = initial_state(str(ref_store), temperature_K=300.0, seed=1, tile_n=tile)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        simulate(model, init, steps=20, temperature_K=300.0, stride=20, out=Path(d) / "w.zarr")
        s = simulate(model, init, steps=400, temperature_K=300.0, stride=20, out=Path(d) / "t.zarr")
    return 400 / s.seconds


def test_a_member_whose_job_hits_its_walltime_resumes_from_its_checkpoint(slurm, ref_store, tmp_path):
    # a member of ~150 s on one core: SLURM ends a 1-minute job 60-90 s after it starts (it checks
    # time limits every 30 s) and its worker needs ~5-10 s to start, so no job can finish it alone and
    # two or three jobs, each resuming from the last checkpoint, can. (A job can end during the
    # member's analysis after completing the simulation: the next one then only analyses it, and the
    # summary still reports the last resume.) The box
    # tiled 2x2x2 (3072 atoms), and a time
    # step that makes those steps 1 ps whatever the machine's speed: the small test model is not
    # made for long runs (it heats away after ~3.7 ps); forces clipped at 5 eV/Å (clip counts are
    # part of the checkpoint: resume stays exact); a checkpoint every fifth of the run
    steps = int(150 * _steps_per_s(ref_store, tile=2)) // 250 * 250
    ck = steps // 5
    assert ck >= 50, f"this machine runs {steps} steps in 150 s: too slow for the test's sizing"
    dt_fs = min(0.5, 1000.0 / steps)
    cfg = _config(tmp_path / "ens.toml", ref_store, f"""checkpoint_every = {ck}

[models]

[defaults]
steps = {steps}
dt_fs = {dt_fs!r}
tile = 2
stride = 50
seed = 7
max_force_ev_per_angstrom = 5.0

[cluster]
kind = "slurm"
jobs = 1
walltime = "00:01:00"
memory = "1500MB"
log_directory = "{tmp_path / 'logs'}"
""")
    out = tmp_path / "out"
    run = _ensemble("run", str(cfg), "--out", str(out), env=slurm.env)
    seen: dict[str, str] = {}
    deadline = time.time() + 720          # two or three jobs of 60-90 s, each queued and started
    while run.poll() is None and time.time() < deadline:
        seen.update(slurm.jobs())
        time.sleep(0.5)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 0, stderr + slurm.logs()
    (summary,) = [json.loads(p.read_text()) for p in (out / "members").glob("*.json")]
    assert summary["status"] == "complete" and summary["steps_done"] == steps
    assert len(seen) >= 2, f"the member finished within one job ({steps} steps): {seen}"
    # the job that finished it is not the first one, and the simulation did not start over at step 0
    assert summary["batch_job"] != min(seen, key=int)
    assert ck <= summary["resumed_from_step"] < steps
    import zarr
    store = out / "members" / f"{summary['id']}.zarr"
    resumes = zarr.open_group(store, mode="r").attrs["resumed_from_steps"]
    assert resumes[-1] == summary["resumed_from_step"]
    # every job after the first continued the simulation from a checkpoint, but the last may have
    # found it finished (its predecessor ended during the analysis) and only analysed it
    assert len(seen) - 2 <= len(resumes) <= len(seen) - 1
    assert all(r >= ck for r in resumes) and resumes == sorted(resumes)
    ds = xr.open_zarr(store, consolidated=False)
    assert ds.sizes["md_step"] == steps and np.array_equal(ds["md_step"].values, np.arange(1, steps + 1))
    assert ds["step"].values[-1] == steps and np.all(np.diff(ds["step"].values) == 50)


def test_fit_on_slurm_workers_equals_the_local_fit(slurm, ref_store, tmp_path):
    cfg = tmp_path / "fit.toml"
    cfg.write_text(f"""[fit]
kind = "agent"
frame_stride = 10
chunk_frames = 10

[cluster]
kind = "slurm"
jobs = 2
memory = "1500MB"
walltime = "00:10:00"
log_directory = "{tmp_path / 'logs'}"
""")
    on_slurm = subprocess.run([sys.executable, "-m", "ensemble", "fit", str(ref_store), "--config", str(cfg),
                               "--out", str(tmp_path / "slurm.json")], env=slurm.env, capture_output=True, text=True,
                              timeout=400)
    assert on_slurm.returncode == 0, on_slurm.stderr + slurm.logs()
    assert "slurm 2 jobs of 1 core(s) / 1500MB / 00:10:00" in on_slurm.stderr
    local = subprocess.run([sys.executable, "-m", "ensemble", "fit", str(ref_store), "--config", str(cfg),
                            "--cluster", "local", "--workers", "1", "--out", str(tmp_path / "local.json")],
                           env=slurm.env, capture_output=True, text=True, timeout=400)
    assert local.returncode == 0, local.stderr
    a = json.loads((tmp_path / "slurm.json").read_text())
    b = json.loads((tmp_path / "local.json").read_text())
    assert a["metrics"]["chosen_groups"] == b["metrics"]["chosen_groups"]
    for sp in ("H", "O"):
        va = a["metrics"]["relative_rmse"]["quadratic"][sp]["validation"]
        vb = b["metrics"]["relative_rmse"]["quadratic"][sp]["validation"]
        assert 0.0 < va < 1.0 and abs(va - vb) <= 1e-9 * vb
    assert slurm.jobs() == {} or all(s != "RUNNING" for s in slurm.jobs().values())


def test_the_job_script_carries_the_cluster_table(tmp_path):
    """What a [cluster] table becomes in the batch script (no SLURM needed: nothing is submitted)."""
    pytest.importorskip("dask_jobqueue", reason="pip install 'ensemble[cluster]' (dask-jobqueue)")
    from ensemble.cluster import _job_queue_cluster, cluster_spec

    spec = cluster_spec({"kind": "slurm", "maximum_jobs": 4, "cores": 2, "memory": "6GB", "walltime": "02:30:00",
                         "queue": "short", "account": "chem42", "prologue": ["module load python/3.11"],
                         "directives": ["--qos=debug"], "log_directory": str(tmp_path / "logs")})
    cluster = _job_queue_cluster(spec)
    try:
        script = cluster.job_script()
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")      # loopback unless asked
        assert cluster.dashboard_link.startswith("http://127.0.0.1:")
    finally:
        cluster.close()
    for line in ("#SBATCH -p short", "#SBATCH -A chem42", "#SBATCH -n 1", "#SBATCH --cpus-per-task=2",
                 "#SBATCH --mem=6G", "#SBATCH -t 02:30:00", "#SBATCH --qos=debug", "export OMP_NUM_THREADS=1",
                 "export NUMBA_NUM_THREADS=1", "export MALLOC_MMAP_THRESHOLD_=33554432",
                 "export MALLOC_TRIM_THRESHOLD_=67108864", "module load python/3.11",
                 f"#SBATCH -e {tmp_path / 'logs'}/ensemble-worker-%J.err"):
        assert line in script.splitlines(), (line, script)
    # two single-threaded workers per job sharing its memory (6 GB = 5.59 GiB), on loopback
    assert "--nthreads 1 --memory-limit 2.79GiB --nworkers 2" in script and script.rstrip().endswith("--interface lo")


@pytest.mark.parametrize("kind, lines", [
    ("pbs", ["#PBS -q short", "#PBS -A chem42", "#PBS -l select=1:ncpus=2:mem=5723MB", "#PBS -l walltime=02:30:00",
             "#PBS -l place=scatter"]),
    ("sge", ["#$ -q short", "#$ -P chem42", "#$ -l h_rt=02:30:00", "#$ -l place=scatter"]),
])
def test_pbs_and_sge_job_scripts(kind, lines):
    pytest.importorskip("dask_jobqueue", reason="pip install 'ensemble[cluster]' (dask-jobqueue)")
    from ensemble.cluster import _job_queue_cluster, cluster_spec

    spec = cluster_spec({"kind": kind, "jobs": 1, "cores": 2, "memory": "6GB", "walltime": "02:30:00",
                         "queue": "short", "account": "chem42", "directives": ["-l place=scatter"]})
    cluster = _job_queue_cluster(spec)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in lines + ["export OMP_NUM_THREADS=1"]:
        assert line in script.splitlines(), (line, script)
    assert "--nthreads 1 --memory-limit 2.79GiB --nworkers 2" in script
