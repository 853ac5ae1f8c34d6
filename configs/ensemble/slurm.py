"""Run an ensemble on a SLURM cluster with dask-jobqueue (pip install dask-jobqueue).

    python configs/ensemble/slurm.py configs/ensemble/study.toml study/

Each SLURM job is one single-threaded dask worker (members are serial numba kernels); the
scheduler runs here. Adjust queue, account, memory and walltime to your site. Alternatively
start the scheduler and workers yourself and use `ensemble run CONFIG --scheduler tcp://HOST:8786`.
"""

import sys

from dask_jobqueue import SLURMCluster
from distributed import Client

from ensemble.cluster import warm_kernels
from ensemble.runner import aggregate, load_ensemble, resolve_embedded, run_ensemble

config, out = sys.argv[1], sys.argv[2]
ens = resolve_embedded(load_ensemble(config), out)
cluster = SLURMCluster(queue="normal", cores=1, processes=1, memory="4GB", walltime="04:00:00",
                       job_script_prologue=["export OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1"])
cluster.scale(jobs=32)                       # or cluster.adapt(minimum_jobs=0, maximum_jobs=64)
with Client(cluster) as client:
    print("dashboard:", client.dashboard_link)
    client.wait_for_workers(1)
    client.run(warm_kernels)                 # workers that join later warm on their first member
    summaries = run_ensemble(ens, out, client)
aggregate(ens, out, summaries)
print(open(f"{out}/summary.md").read())
