"""The [cluster] table and the cluster options: parsing, overrides, and one-line refusals before
anything starts (the clusters themselves are exercised in test_runner.py and test_slurm.py)."""

from __future__ import annotations

import pytest

from conftest import DATA
from ensemble.cluster import ClusterConfigError, ClusterSpec, cluster_spec
from ensemble.errors import UserError
from ensemble.runner import load_ensemble

SLURM = {"kind": "slurm", "maximum_jobs": 8, "cores": 4, "memory": "8GB", "walltime": "04:00:00",
         "queue": "normal", "account": "chem", "prologue": ["module load python"], "interface": "ib0"}


def test_a_full_slurm_table_and_its_description():
    spec = cluster_spec(SLURM, where="s.toml [cluster]")
    assert spec == ClusterSpec(kind="slurm", maximum_jobs=8, cores=4, memory="8GB", walltime="04:00:00",
                               queue="normal", account="chem", prologue=("module load python",), interface="ib0")
    assert spec.describe() == ("slurm adaptive 0-8 jobs of 4 core(s) / 8GB / 04:00:00, queue normal, account chem, "
                               "scheduler on ib0")
    assert cluster_spec({"kind": "pbs", "jobs": 2}).job_memory == "2GB"        # 2 GB per core by default


def test_command_line_overrides_the_table():
    # --jobs replaces the adaptive bounds; --cluster local runs a batch-system table here instead
    assert cluster_spec(SLURM, jobs=3).describe().startswith("slurm 3 jobs of 4 core(s)")
    local = cluster_spec(SLURM, kind="local", workers=2)
    assert (local.kind, local.workers, local.jobs, local.maximum_jobs) == ("local", 2, None, None)
    sched = cluster_spec(SLURM, scheduler="tcp://127.0.0.1:8786")
    assert (sched.kind, sched.address) == ("scheduler", "tcp://127.0.0.1:8786")
    assert cluster_spec(None).describe().startswith("LocalCluster, ")
    assert cluster_spec({"workers": 4}, kind="slurm", jobs=2).workers is None


@pytest.mark.parametrize("table, message", [
    ({"kind": "slurm"}, "kind = 'slurm' needs jobs = N"),
    ({"kind": "slurm", "jobs": 2, "maximum_jobs": 4}, "not both"),
    ({"kind": "slurm", "minimum_jobs": 5, "maximum_jobs": 4}, "minimum_jobs 5 exceeds maximum_jobs 4"),
    ({"kind": "local", "jobs": 2}, "jobs / minimum_jobs / maximum_jobs are for batch jobs"),
    ({"kind": "cloud"}, "kind = 'cloud'; expected one of local, scheduler, slurm, pbs, sge"),
    ({"kind": "scheduler"}, "needs address"),
    ({"kind": "slurm", "jobs": 2, "workers": 4}, "workers (--workers) is for kind = \"local\""),
    ({"cores": "4"}, "cores = '4' should be int"),
    ({"cores": True}, "cores = True should be int"),
    ({"cores": 0}, "cores must be >= 1"),
    ({"memory": "plenty"}, "memory = 'plenty'; expected a size"),
    ({"kind": "slurm", "jobs": 1, "walltime": "4h"}, "walltime = '4h'; expected HH:MM:SS"),
    ({"prologue": "module load x"}, "prologue = 'module load x' should be a list of strings"),
    ({"nodes": 2}, "unknown key 'nodes'; known: kind, address"),
])
def test_bad_tables_are_one_line_errors_naming_the_table(table, message):
    with pytest.raises(ClusterConfigError) as err:
        cluster_spec(table, where="study.toml [cluster]")
    text = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in text
    assert text.startswith("study.toml [cluster]: ") and message in text


def _config(tmp_path, cluster: str):
    p = tmp_path / "ens.toml"
    p.write_text(f"""[ensemble]
reference = "embedded"
checkpoint_every = 500
[models]
c = "{DATA / 'models' / 'conservative-c5.json'}"
[defaults]
steps = 100
{cluster}""")
    return p


def test_the_ensemble_reads_cluster_and_checkpoint_every(tmp_path):
    ens = load_ensemble(_config(tmp_path, '[cluster]\nkind = "slurm"\njobs = 4\n'))
    assert ens.cluster == {"kind": "slurm", "jobs": 4} and ens.checkpoint_every == 500
    with pytest.raises(ClusterConfigError, match=r"ens.toml \[cluster\]: unknown key 'gpus'"):
        load_ensemble(_config(tmp_path, "[cluster]\ngpus = 1\n"))
    with pytest.raises(UserError, match=r"checkpoint_every = 0 should be an integer >= 1"):
        load_ensemble(_write(tmp_path, _config(tmp_path, "").read_text().replace("= 500", "= 0")))


def _write(tmp_path, text):
    p = tmp_path / "ens0.toml"
    p.write_text(text)
    return p


def test_run_refuses_an_incomplete_cluster_before_writing_anything(tmp_path, capsys):
    from ensemble.cli import main

    cfg = _config(tmp_path, '[cluster]\nkind = "slurm"\nwalltime = "02:00:00"\n')
    assert main(["run", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cfg} [cluster]: kind = 'slurm' needs jobs = N") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    assert main(["run", str(cfg), "--out", str(tmp_path / "out"), "--cluster", "sge", "--jobs", "0"]) == 2
    assert "jobs must be >= 1, got 0" in capsys.readouterr().err and not (tmp_path / "out").exists()


def _faults_of_a_megabyte_churn():
    import os
    import resource

    import numpy as np

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(200):
        a = np.ones(2**17)                 # 1 MiB, written: a fresh mmap faults in 256 pages each time
        a.sum()
        del a
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
            {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")})


def test_local_workers_reuse_freed_arrays_instead_of_faulting_them_in_again(monkeypatch):
    """dask's default MALLOC_TRIM_THRESHOLD_ freezes the mmap threshold at 128 KiB, so every 1 MiB
    temporary is a new mapping (256 page faults, 51 200 for 200 of them); the workers open_client
    starts get glibc's own ceilings and reuse the heap."""
    from ensemble.cluster import WORKER_MALLOC, open_client

    for key in WORKER_MALLOC:      # as in a fresh process (a plain LocalCluster leaves dask's value here)
        monkeypatch.delenv(key, raising=False)
    with open_client(n_workers=1, report=lambda m: None) as client:
        faults, env = next(iter(client.run(_faults_of_a_megabyte_churn).values()))
    assert env == {**WORKER_MALLOC, "OMP_NUM_THREADS": "1"}
    assert faults < 5000, faults


def test_a_users_own_malloc_setting_wins(monkeypatch):
    from ensemble.cluster import open_client

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with open_client(n_workers=1, report=lambda m: None) as client:
        faults, env = next(iter(client.run(_faults_of_a_megabyte_churn).values()))
    assert env["MALLOC_TRIM_THRESHOLD_"] == "65536" and env["MALLOC_MMAP_THRESHOLD_"] == str(32 * 2**20)
