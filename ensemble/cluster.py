"""Dask clusters: a LocalCluster sized to the machine, or an existing scheduler.

numba kernels are warmed once per worker (compiled or loaded from cache) before
work fans out; workers use one BLAS / OpenMP thread each.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

__all__ = ["open_client", "warm_kernels"]

_SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                  "NUMBA_NUM_THREADS": "1"}


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
    fr = angular_frame(pos, box, sp, arr, jacobian=True)
    fr.vjp(sp, arr, fr.x, True)
    # many-body features, design rows of both kinds (scatter and BLAS paths), the prior, MD forces
    from .features import FeatureSpec, frame_terms
    from .fit.design import agent_feature_rows, conservative_feature_rows, conservative_rows_blas
    from .prior import ShortRangePrior

    spec = FeatureSpec(2, ws.subset([0, 9]), default_angular_basis(3.0), "pair", 3.0, 1.0)
    terms = frame_terms(pos, box, sp, spec, jacobian=True)
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
def open_client(scheduler: str | None = None, n_workers: int | None = None, report=None) -> Iterator:
    """A dask.distributed Client: on ``scheduler`` if given, else on a new LocalCluster with one
    single-threaded worker process per core (dashboard on localhost, link reported)."""
    from distributed import Client, LocalCluster

    report = report or (lambda msg: print(msg, file=sys.stderr))
    if scheduler:
        client = Client(scheduler)
        cluster = None
    else:
        n = n_workers or max(1, min(os.cpu_count() or 1, 8))
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               dashboard_address="127.0.0.1:0", env=_SINGLE_THREAD)
        client = Client(cluster)
    try:
        report(f"dask: {len(client.scheduler_info()['workers'])} workers, dashboard {client.dashboard_link}")
        client.register_plugin(WarmKernels())      # every worker, also those that join (or rejoin) later
        yield client
    finally:
        import logging

        # workers' last heartbeats race the scheduler's shutdown; those messages are noise here
        quiet = [logging.getLogger(n) for n in ("distributed", "distributed.comm", "distributed.core",
                                                 "distributed.worker", "distributed.nanny")]
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
