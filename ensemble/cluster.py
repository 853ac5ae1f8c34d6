"""Dask clusters: a LocalCluster sized to the machine, an existing scheduler, or batch jobs
(SLURM, PBS, SGE) through dask-jobqueue.

Where the workers come from is a :class:`ClusterSpec`, read from a ``[cluster]`` table (the
ensemble TOML, or the fit config) by :func:`cluster_spec` and overridden by the command line
(``--cluster``, ``--scheduler``, ``--workers``, ``--jobs``). Workers are single-threaded
processes (numba kernels are serial; one BLAS / OpenMP thread each). Nothing listens beyond
loopback unless asked: the dashboard is on 127.0.0.1, and a job-queue scheduler on the
loopback interface unless ``interface`` names another (as it must when workers run on other
nodes). numba kernels are warmed once per worker (compiled or loaded from cache) when it
joins, also for workers that join later (adaptive scaling, a replaced job).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Iterator

from .errors import UserError

__all__ = ["ClusterSpec", "ClusterConfigError", "check_cluster_table", "cluster_spec", "open_client", "warm_kernels",
           "process_peak_rss_mb",
           "KINDS", "JOB_QUEUES"]

_SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                  "NUMBA_NUM_THREADS": "1"}

#: glibc malloc settings of worker processes, set before they start. dask's own default
#: (MALLOC_TRIM_THRESHOLD_=65536) also freezes glibc's mmap threshold at 128 KiB, so every array
#: above that is a fresh mmap and each batch of a Gram chunk page-faults its temporaries in anew:
#: 1.1 million faults and ~25 % more time for 8 frames of the conservative fit. These two values
#: are the ceilings glibc's dynamic thresholds reach by themselves in a plain Python process: arrays
#: up to 32 MiB reuse the heap, and at most 64 MiB of free heap top is kept (per worker): 35-100 MB
#: more peak RSS per worker for 8-20 % more frames/s (README, ``ensemble bench gram``). Either
#: variable set in the environment of ``ensemble`` (local workers) or in a job-script prologue line
#: (batch workers) takes precedence.
WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(64 * 2**20)}

#: every kind of cluster, and the batch systems among them (dask-jobqueue's cluster classes)
JOB_QUEUES = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster"}
KINDS = ("local", "scheduler", *JOB_QUEUES)


class ClusterConfigError(UserError, ValueError):
    """A ``[cluster]`` table or a cluster option that cannot work, found before any cluster starts."""


@dataclass(frozen=True)
class ClusterSpec:
    """Where the dask workers come from (see the README, "Ensembles", for sizing).

    ``local``: ``workers`` single-threaded processes on this machine (default: one per core, at
    most 8), each limited to ``memory`` (default: the machine's memory shared among them).
    ``scheduler``: an existing dask scheduler at ``address``. ``slurm`` / ``pbs`` / ``sge``: batch
    jobs of ``cores`` cores and ``memory`` each (one single-threaded worker per core, so each
    worker may use memory / cores), running at most ``walltime`` in ``queue`` charged to
    ``account``; ``jobs`` of them all along, or adaptively between ``minimum_jobs`` and
    ``maximum_jobs`` as work waits. A job that ends early (cancelled, walltime, node failure)
    is replaced while work remains. ``prologue`` lines run in the job script before the worker
    (``module load ...``, ``source venv/bin/activate``); ``directives`` are extra scheduler
    directives (``["--qos=debug"]``). The scheduler listens on ``interface`` (default ``lo``:
    loopback, which only works when the jobs run on this machine; name the interface the compute
    nodes reach this host on, e.g. ``ib0``). The dashboard listens on ``dashboard_address``
    (default a free port on 127.0.0.1).
    """

    kind: str = "local"
    address: str | None = None
    workers: int | None = None
    memory: str | None = None
    cores: int = 1
    walltime: str = "01:00:00"
    queue: str | None = None
    account: str | None = None
    jobs: int | None = None
    minimum_jobs: int | None = None
    maximum_jobs: int | None = None
    prologue: tuple[str, ...] = ()
    directives: tuple[str, ...] = ()
    interface: str | None = None
    dashboard_address: str = "127.0.0.1:0"
    local_directory: str | None = None
    log_directory: str | None = None
    python: str | None = None
    where: str = field(default="cluster", compare=False)

    def __post_init__(self):
        w = self.where
        if self.kind not in KINDS:
            raise ClusterConfigError(f"{w}: kind = {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.kind == "scheduler" and not self.address:
            raise ClusterConfigError(f"{w}: kind = \"scheduler\" needs address = \"tcp://HOST:PORT\" "
                                     "(or --scheduler ADDRESS)")
        if self.kind != "scheduler" and self.address:
            raise ClusterConfigError(f"{w}: address is only for kind = \"scheduler\" (kind is {self.kind!r})")
        if self.workers is not None and self.kind != "local":
            raise ClusterConfigError(f"{w}: workers (--workers) is for kind = \"local\" (kind is {self.kind!r}); "
                                     "batch jobs are counted by jobs (--jobs) or minimum_jobs / maximum_jobs")
        for name in ("workers", "cores", "jobs", "maximum_jobs"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ClusterConfigError(f"{w}: {name} must be >= 1, got {v}")
        if self.minimum_jobs is not None and self.minimum_jobs < 0:
            raise ClusterConfigError(f"{w}: minimum_jobs must be >= 0, got {self.minimum_jobs}")
        if self.memory is not None:
            _bytes(self.memory, f"{w}: memory")
        if not re.fullmatch(r"(\d+-)?\d{1,3}(:\d{2}){0,2}", self.walltime):
            raise ClusterConfigError(f"{w}: walltime = {self.walltime!r}; expected HH:MM:SS (or D-HH:MM:SS)")
        if self.kind in JOB_QUEUES:
            adaptive = self.minimum_jobs is not None or self.maximum_jobs is not None
            if self.jobs is not None and adaptive:
                raise ClusterConfigError(f"{w}: give jobs (a fixed number) or minimum_jobs / maximum_jobs "
                                         "(adaptive), not both")
            if self.jobs is None and self.maximum_jobs is None:
                raise ClusterConfigError(f"{w}: kind = {self.kind!r} needs jobs = N (that many jobs all along) or "
                                         "maximum_jobs = N (adaptive, from minimum_jobs, default 0); on the command "
                                         "line --jobs N")
            if adaptive and (self.minimum_jobs or 0) > (self.maximum_jobs or 0):
                raise ClusterConfigError(f"{w}: minimum_jobs {self.minimum_jobs} exceeds maximum_jobs "
                                         f"{self.maximum_jobs}")
        elif self.jobs is not None or self.minimum_jobs is not None or self.maximum_jobs is not None:
            raise ClusterConfigError(f"{w}: jobs / minimum_jobs / maximum_jobs are for batch jobs "
                                     f"({', '.join(JOB_QUEUES)}); kind is {self.kind!r}")

    @property
    def job_memory(self) -> str:
        """Memory of one batch job (default 2 GB per core)."""
        return self.memory or f"{2 * self.cores}GB"

    def describe(self) -> str:
        if self.kind == "local":
            return f"LocalCluster, {self.workers or _default_workers()} workers"
        if self.kind == "scheduler":
            return f"scheduler {self.address}"
        size = (f"{self.jobs} jobs" if self.jobs is not None
                else f"adaptive {self.minimum_jobs or 0}-{self.maximum_jobs} jobs")
        where = ", ".join(x for x in (self.queue and f"queue {self.queue}", self.account and f"account {self.account}")
                          if x)
        return (f"{self.kind} {size} of {self.cores} core(s) / {self.job_memory} / {self.walltime}"
                + (f", {where}" if where else "") + f", scheduler on {self.interface or 'lo'}")


_TYPES = {"kind": str, "address": str, "workers": int, "memory": str, "cores": int, "walltime": str, "queue": str,
          "account": str, "jobs": int, "minimum_jobs": int, "maximum_jobs": int, "prologue": list,
          "directives": list, "interface": str, "dashboard_address": str, "local_directory": str,
          "log_directory": str, "python": str}


def _bytes(text: str, where: str) -> int:
    from dask.utils import parse_bytes

    try:
        n = parse_bytes(text)
    except (ValueError, TypeError):
        n = 0
    if not isinstance(text, str) or n <= 0:
        raise ClusterConfigError(f"{where} = {text!r}; expected a size such as \"4GB\" or \"1500MiB\"")
    return n


def check_cluster_table(table, where: str = "[cluster]") -> dict:
    """``table`` if it is a ``[cluster]`` table of known keys with the right types, else a one-line error."""
    if not isinstance(table, dict):
        raise ClusterConfigError(f"{where}: expected a table of settings, got {table!r}")
    for key, value in table.items():
        want = _TYPES.get(key)
        if want is None:
            raise ClusterConfigError(f"{where}: unknown key {key!r}; known: {', '.join(_TYPES)}")
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is list and ok:
            ok = all(isinstance(x, str) for x in value)
        if not ok:
            kind = "a list of strings" if want is list else want.__name__
            raise ClusterConfigError(f"{where}: {key} = {value!r} should be {kind}")
    return table


def cluster_spec(table: dict | None = None, *, where: str = "[cluster]", **overrides) -> ClusterSpec:
    """A :class:`ClusterSpec` from a ``[cluster]`` TOML table, then command-line ``overrides``
    (None values ignored). Unknown keys and wrong types are one-line errors naming ``where``.

    ``scheduler=ADDRESS`` among the overrides selects kind ``scheduler``; ``kind`` given on the
    command line replaces the table's (its other keys stay); ``jobs`` replaces adaptive bounds.
    """
    raw = dict(check_cluster_table(table or {}, where))
    over = {k: v for k, v in overrides.items() if v is not None}
    if "scheduler" in over:
        over["kind"], over["address"] = "scheduler", over.pop("scheduler")
    if over.get("kind") not in (None, "scheduler"):
        raw.pop("address", None)
    if "jobs" in over:
        raw.pop("minimum_jobs", None)
        raw.pop("maximum_jobs", None)
    raw.update(over)
    # a table written for one kind, run on another from the command line: drop what does not apply
    if over.get("kind", "slurm") not in JOB_QUEUES:
        for key in ("jobs", "minimum_jobs", "maximum_jobs"):
            if key not in over:
                raw.pop(key, None)
    if over.get("kind", "local") != "local" and "workers" not in over:
        raw.pop("workers", None)
    for key in ("prologue", "directives"):
        if key in raw:
            raw[key] = tuple(raw[key])
    return ClusterSpec(**raw, where=where)


def _default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def process_peak_rss_mb() -> float:
    """Peak resident memory of this process (MB): VmHWM of its own address space.

    Not ``getrusage(...).ru_maxrss``: Linux carries that over ``fork`` + ``exec``, so a worker
    process spawned by a large parent would report the parent's peak as its own.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def warm_kernels() -> str:
    """Call every numba kernel once on a tiny system (compiles, or loads the on-disk cache)."""
    import numpy as np

    from .fit.gram import conservative_design, pair_gradients
    from .invariants import invariants_frames, paper_weights
    from .model import conservative_forces

    k, p = paper_weights().arrays()
    pos = np.array([[0.0, 0.0, 0.0], [1.0, 0.2, 0.1], [0.3, 1.1, 0.2]])
    box = np.full(3, 10.0)
    sp = np.array([0, 1, 1])
    phi, _ = invariants_frames(pos[None], box[None], sp, 2, k, p, -1.0, 1.0)
    invariants_frames(pos[None], box[None], sp, 2, k, p, 3.0, 1.0)
    pair_gradients(pos, box, k, p, -1.0, 1.0)
    conservative_design(pos, box, sp, 2, k, p, -1.0, 1.0, phi[0].reshape(3, -1), True)
    conservative_forces(pos, box, sp, 2, k, p, -1.0, 1.0, np.zeros((3, 2 * len(k))))
    # MD force paths (Verlet list + per-pair terms; paper mode) of both kinds, and the analysis kernels
    from .analysis import rdf_counts_kernel
    from .model import Model

    ws = paper_weights()
    n = 2 * len(ws)
    for kind in ("agent", "conservative"):
        for cutoff in (None, 3.0):
            model = Model(kind, ("H", "O"), (1.008, 15.999), ws, (np.zeros(n), np.zeros(n)),
                          (np.zeros((n, n)), np.zeros((n, n))), cutoff_angstrom=cutoff)
            model.force_fn(box, np.array(["O", "H", "H"]))(pos)
    rdf_counts_kernel(pos[None], box, sp, np.array([[0, 1], [1, 2]]), 3.0, 10)
    # angular invariants: features, Jacobian and vector-Jacobian product
    from .angular import angular_frame, default_angular_basis

    arr = default_angular_basis(3.0).arrays(2)
    fr = angular_frame(pos, box, sp, arr)
    fr.vjp(fr.x, True)
    fr.jacobian()
    fr.self_gradient()
    fr.add_design_columns(0, fr.x.shape[1], np.zeros((9, 2 * fr.x.shape[1])))
    # many-body features, design rows of both kinds (scatter and BLAS paths), the prior, MD forces
    from .features import FeatureSpec, frame_terms
    from .fit.design import agent_feature_rows, conservative_feature_rows, conservative_rows_blas
    from .prior import ShortRangePrior

    spec = FeatureSpec(2, ws.subset([0, 9]), default_angular_basis(3.0), "pair", 3.0, 1.0)
    terms = frame_terms(pos, box, sp, spec)
    width = 2 * spec.block + 1
    conservative_feature_rows(terms, sp, spec, np.zeros((9, width)))
    conservative_rows_blas(terms, sp, spec, np.zeros((9, width)))
    qj, ql = spec.quadratic_pairs()
    agent_feature_rows(terms.x, terms.self_gradient(sp, 2), qj, ql, np.zeros((3, 3)), 1.0,
                       np.zeros((9, spec.block + 1)))
    f = spec.n_features
    prior = ShortRangePrior(("H", "O"), np.full((2, 2), 1.5))
    for kind in ("agent", "conservative"):
        Model(kind, ("H", "O"), (1.008, 15.999), spec.weights, (np.zeros(f), np.zeros(f)),
              (np.zeros((f, f)), np.zeros((f, f))), cutoff_angstrom=3.0, angular=spec.angular,
              prior=prior).force_fn(box, np.array(["O", "H", "H"]))(pos)
    from .analysis import topology_frames
    topology_frames(pos[None], box, np.array([0]), np.array([1, 2]), 1.5)
    # the long-step map (ensemble.md.action): features, Hessian blocks, Newton blocks, one step
    from .md.action import ActionModel, ModelPotential, action_integrator, default_features

    feats = default_features(("H", "O"))
    cons = Model("conservative", ("H", "O"), (1.008, 15.999), ws, (np.zeros(n), np.zeros(n)),
                 (np.zeros((n, n)), np.zeros((n, n))), cutoff_angstrom=3.0)
    am = ActionModel("action", 1.0, feats, np.full(feats.n_features, 1e-9))
    init_fn, step_fn = action_integrator(ModelPotential(cons, box, ["O", "H", "H"]), am, np.array([15.999, 1.008, 1.008]),
                                         ["O", "H", "H"], box, max_iter=2, fail_angstrom=np.inf)
    step_fn(init_fn(pos, np.zeros_like(pos)))
    feats.bind(["O", "H", "H"], np.ones(3), box).columns(pos, np.zeros_like(pos))
    return "warm"


class _NoComputeFailed:
    """Drops a worker's "Compute Failed" log record: the client re-raises the task's exception
    (a user error as one line, a bug with its traceback), so the worker's copy is noise."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith("Compute Failed")


def quiet_task_failures() -> None:
    """Install :class:`_NoComputeFailed` on this process's ``distributed.worker`` logger (once)."""
    import logging

    log = logging.getLogger("distributed.worker")
    if not any(isinstance(f, _NoComputeFailed) for f in log.filters):
        log.addFilter(_NoComputeFailed())


def _warm_plugin_class():
    from distributed.diagnostics.plugin import WorkerPlugin

    class _WarmKernels(WorkerPlugin):
        """Warm the numba kernels on a worker when it starts (and on workers already running)."""

        name = "ensemble-warm-kernels"

        def setup(self, worker):
            warm_kernels()
            quiet_task_failures()

    return _WarmKernels


def WarmKernels():  # noqa: N802 - reads as a class at the call site
    return _warm_plugin_class()()


@contextlib.contextmanager
def open_client(scheduler: str | None = None, n_workers: int | None = None, report=None, *,
                spec: ClusterSpec | None = None) -> Iterator:
    """A dask.distributed Client on the cluster ``spec`` describes (default: on ``scheduler`` if
    given, else on a new LocalCluster with ``n_workers`` single-threaded worker processes, one
    per core). Reports the cluster and its dashboard link; closes what it started (batch jobs
    are cancelled)."""
    from distributed import Client

    report = report or (lambda msg: print(msg, file=sys.stderr))
    if spec is None:
        spec = ClusterSpec(kind="scheduler", address=scheduler) if scheduler else ClusterSpec(workers=n_workers)
    cluster = None
    if spec.kind == "scheduler":
        try:
            client = Client(spec.address, timeout="10s")
        except (OSError, TimeoutError) as exc:
            raise ClusterConfigError(f"--scheduler {spec.address}: no dask scheduler answers there within 10 s "
                                     f"({type(exc).__name__}); start one (`dask scheduler`) or leave --scheduler "
                                     "out for a LocalCluster") from None
    elif spec.kind == "local":
        from distributed import LocalCluster

        # read by glibc when a worker process starts, so they must be in the environment it is spawned
        # with: the nanny copies its pre-spawn variables from this process's environment, where a value
        # already set wins over dask's configured default (a user's own setting is kept)
        for key, value in WORKER_MALLOC.items():
            os.environ.setdefault(key, value)
        cluster = LocalCluster(n_workers=spec.workers or _default_workers(), threads_per_worker=1, processes=True,
                               dashboard_address=spec.dashboard_address, env=_SINGLE_THREAD,
                               memory_limit=spec.memory or "auto", local_directory=spec.local_directory,
                               host="127.0.0.1")
        client = Client(cluster)
    else:
        cluster = _job_queue_cluster(spec)
        client = Client(cluster)
    try:
        n = len(client.scheduler_info()["workers"])
        report(f"dask: {spec.describe()}; {n} workers connected, scheduler {client.scheduler.address}, "
               f"dashboard {client.dashboard_link}")
        if spec.kind in JOB_QUEUES and (spec.interface or "lo") == "lo":
            report("dask: the scheduler listens on loopback only, so jobs must run on this machine; for jobs on "
                   "other nodes set [cluster] interface (e.g. \"ib0\")")
        client.register_plugin(WarmKernels())      # every worker, also those that join (or rejoin) later
        yield client
    finally:
        import logging

        # workers' last heartbeats race the scheduler's shutdown; those messages are noise here
        quiet = [logging.getLogger(n) for n in ("distributed", "distributed.comm", "distributed.core",
                                                 "distributed.worker", "distributed.nanny",
                                                 "distributed.deploy.adaptive", "dask_jobqueue")]
        levels = [lg.level for lg in quiet]
        for lg in quiet:
            lg.setLevel(logging.CRITICAL)
        try:
            client.close()
            if cluster is not None:
                cluster.close()
        finally:
            for lg, lv in zip(quiet, levels):
                lg.setLevel(lv)


def _job_queue_cluster(spec: ClusterSpec):
    """A dask-jobqueue cluster: one single-threaded worker per core of each job; fixed ``jobs``
    are kept by an adaptive loop pinned at that number, so a job that ends early is replaced."""
    try:
        import dask_jobqueue
    except ImportError:
        raise ClusterConfigError(f"{spec.where}: kind = {spec.kind!r} needs dask-jobqueue: pip install "
                                 "'ensemble[cluster]' (or pip install dask-jobqueue)") from None
    import dask

    interface = spec.interface or "lo"
    kwargs = dict(cores=spec.cores, processes=spec.cores, memory=spec.job_memory, walltime=spec.walltime,
                  queue=spec.queue, interface=interface, job_name="ensemble-worker",
                  job_script_prologue=[f"export {k}={v}" for k, v in {**_SINGLE_THREAD, **WORKER_MALLOC}.items()]
                  + list(spec.prologue),
                  job_extra_directives=list(spec.directives), local_directory=spec.local_directory,
                  log_directory=spec.log_directory, python=spec.python or sys.executable,
                  scheduler_options={"interface": interface, "dashboard_address": spec.dashboard_address})
    if spec.account:
        kwargs["project" if spec.kind == "sge" else "account"] = spec.account
    if spec.log_directory:
        os.makedirs(spec.log_directory, exist_ok=True)
    cls = getattr(dask_jobqueue, JOB_QUEUES[spec.kind])
    # members and Gram chunks run for seconds to hours: until the scheduler has timed one, assume a
    # minute, so adaptive scaling asks for enough jobs at once instead of one at a time;
    # a task whose worker died is retried up to allowed-failures times; members continue from their
    # checkpoints, so a few more retries than dask's default 3 cost little (a walltime per retry)
    with dask.config.set({"distributed.scheduler.unknown-task-duration": "60s",
                          "distributed.scheduler.allowed-failures": 10}):
        try:
            cluster = cls(**kwargs)
        except ValueError as exc:
            raise ClusterConfigError(f"{spec.where}: {exc}") from None
    if spec.jobs is not None:
        cluster.adapt(minimum_jobs=spec.jobs, maximum_jobs=spec.jobs)
    else:
        cluster.adapt(minimum_jobs=spec.minimum_jobs or 0, maximum_jobs=spec.maximum_jobs)
    return cluster
