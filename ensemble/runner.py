"""Ensembles of learning-based simulations as dask.distributed tasks.

An ensemble is a TOML file (``configs/ensemble/``): ``[models]`` (label -> model JSON),
``[defaults]`` (one member's settings), ``[grid]`` (lists whose Cartesian product makes
members) and ``[[members]]`` (explicit extra members). :func:`load_ensemble` expands and
checks it; every member is a frozen :class:`Member` with an explicit seed and a stable id.

:func:`run_member` is the pure task: it simulates one member into its in-progress store,
checkpointing every ``checkpoint_every`` steps, renames it into place when the run ends (a
member whose model blows up keeps its store with status ``failed: ...``), analyses it
(:func:`ensemble.analysis.analyze`, in the worker) and returns a small summary. A member
whose worker died (a lost node, a cancelled job, a walltime) continues from its last
checkpoint when it runs again, on a retry by the scheduler or in a rerun of the ensemble,
and its trajectory is bitwise the one an uninterrupted run writes. :func:`run_ensemble`
validates everything before anything runs, skips members already finished, submits the rest
to a dask client, reports progress (done / running / failed, ETA) and records every member's
outcome. A worker that dies mid-member has the
member rerun elsewhere by the scheduler, from its last checkpoint.

Directory layout of ``OUT``::

    ensemble.json              the expanded members and where they came from
    members/<id>.zarr          trajectory store of each member (renamed into place when its run ends)
    members/.<id>.zarr.running the store of a member still running, or interrupted: resumable
    members/<id>.stats.zarr    its statistics (ensemble.stats/1)
    members/<id>.json          its summary (status, timings, error)
    aggregate.zarr, summary.md, summary.json, figures/   (ensemble.aggregate)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .configfile import read_toml
from .errors import UserError

__all__ = ["Member", "Ensemble", "EnsembleError", "load_ensemble", "validate", "run_member", "run_ensemble",
           "member_status", "check_transfer", "aggregate", "resolve_embedded", "reference_stats"]

MEMBER_FIELDS = {"model": str, "steps": int, "dt_fs": float, "stride": int, "temperature_K": float, "seed": int,
                 "tile": int, "init_frame": int, "thermostat": str, "tau_fs": float,
                 "max_force_ev_per_angstrom": float, "write_forces": bool, "integrator": str, "action": str}
DEFAULTS = {"steps": 1000, "dt_fs": 0.5, "stride": 4, "temperature_K": 300.0, "seed": 0, "tile": 1,
            "init_frame": -1, "thermostat": "nose-hoover", "tau_fs": 100.0, "max_force_ev_per_angstrom": None,
            "write_forces": False, "integrator": "verlet", "action": None}
THERMOSTATS = ("nose-hoover", "nve")


class EnsembleError(UserError, ValueError):
    """A bad ensemble config or member, found before anything runs."""


@dataclass(frozen=True)
class Member:
    """One simulation of an ensemble: all settings explicit (the seed too)."""

    model: str
    model_path: str
    init_store: str
    steps: int = 1000
    dt_fs: float = 0.5
    stride: int = 4
    temperature_K: float = 300.0
    seed: int = 0
    tile: int = 1
    init_frame: int = -1
    thermostat: str = "nose-hoover"
    tau_fs: float = 100.0
    max_force_ev_per_angstrom: float | None = None
    write_forces: bool = False
    integrator: str = "verlet"      # verlet | action | midpoint | direct | respa (md.simulate.INTEGRATORS)
    action: str | None = None       # action / direct model JSON for those integrators

    @property
    def id(self) -> str:
        """Readable and stable: model, temperature, tiling, seed, plus a hash of every setting."""
        fields = {k: v for k, v in asdict(self).items()          # settings added later count only when set
                  if not (k in ("integrator", "action") and v == DEFAULTS[k])}
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.model}-T{self.temperature_K:g}-x{self.tile}-s{self.seed}-{digest}"

    @property
    def key(self) -> str:
        return f"ensemble-member-{self.id}"


@dataclass(frozen=True)
class Ensemble:
    name: str
    source: str
    reference: str
    members: tuple[Member, ...]
    window_fs: float = 100.0
    models: dict = field(default_factory=dict)
    checkpoint_every: int = 1000           # MD steps between a member's checkpoints (execution, not identity)
    cluster: dict | None = None            # the [cluster] table (checked; see ensemble.cluster.cluster_spec)


def _typed(name: str, value, where: str):
    want = MEMBER_FIELDS.get(name)
    if want is None:
        raise EnsembleError(f"{where}: unknown setting {name!r}; known: {', '.join(sorted(MEMBER_FIELDS))}")
    if value is None:
        return None
    if want is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not np.isfinite(value):
            raise EnsembleError(f"{where}: {name} = {value!r} should be a finite number")
        return float(value)
    if want is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, want):
        return value
    raise EnsembleError(f"{where}: {name} = {value!r} should be {want.__name__}")


def load_ensemble(path: str | Path, *, reference: str | Path | None = None) -> Ensemble:
    """Read and expand an ensemble TOML; every error names the file and the field.

    Model paths and the reference store are relative to the file's directory; ``reference =
    "embedded"`` (or the ``reference`` argument) selects the trajectory members start from
    and are compared with.
    """
    path = Path(path)
    raw = read_toml(path, "ensemble config", EnsembleError)
    unknown = set(raw) - {"ensemble", "models", "defaults", "grid", "members", "cluster"}
    if unknown:
        raise EnsembleError(f"{path}: unknown table(s) {sorted(unknown)}; expected ensemble, models, defaults, "
                            "grid, members, cluster")
    from .cluster import check_cluster_table

    cluster = raw.get("cluster")
    if cluster is not None:
        check_cluster_table(cluster, f"{path} [cluster]")
    checkpoint_every = raw.get("ensemble", {}).get("checkpoint_every", 1000)
    if not isinstance(checkpoint_every, int) or isinstance(checkpoint_every, bool) or checkpoint_every < 1:
        raise EnsembleError(f"{path} [ensemble]: checkpoint_every = {checkpoint_every!r} should be an integer >= 1 "
                            "(MD steps between checkpoints)")
    base = path.parent
    head = raw.get("ensemble", {})
    known_head = {"name": str, "reference": str, "window_fs": (int, float), "checkpoint_every": int}
    for key, value in head.items():
        if key not in known_head:
            raise EnsembleError(f"{path} [ensemble]: unknown key {key!r}; known: {', '.join(sorted(known_head))}")
        if not isinstance(value, known_head[key]) or isinstance(value, bool):
            raise EnsembleError(f"{path} [ensemble]: {key} = {value!r} has the wrong type")
    window_fs = head.get("window_fs", 100.0)
    if not (np.isfinite(window_fs) and window_fs > 0):
        raise EnsembleError(f"{path} [ensemble]: window_fs = {window_fs!r} should be a finite number > 0 (fs)")
    for table in ("models", "defaults", "grid"):
        if not isinstance(raw.get(table, {}), dict):
            raise EnsembleError(f"{path}: [{table}] should be a table, got {raw[table]!r}")
    if not isinstance(raw.get("members", []), list) or not all(isinstance(m, dict) for m in raw.get("members", [])):
        raise EnsembleError(f"{path}: [[members]] should be an array of tables")
    ref = str(reference) if reference is not None else head.get("reference")
    if not ref:
        raise EnsembleError(f"{path}: [ensemble] reference is missing (a trajectory store, or \"embedded\")")
    if ref != "embedded":
        ref = str((base / ref).resolve()) if not Path(ref).is_absolute() else ref
    models = raw.get("models", {})
    if not models:
        raise EnsembleError(f"{path}: [models] is empty; give label = \"model.json\" for each model")
    for k, v in models.items():
        if not isinstance(v, str) or not v:
            raise EnsembleError(f"{path} [models]: {k} = {v!r} should be the path of a model JSON file")
    models = {k: str((base / v).resolve()) if not Path(v).is_absolute() else v for k, v in models.items()}
    defaults = dict(DEFAULTS)
    for k, v in raw.get("defaults", {}).items():
        defaults[k] = _typed(k, v, f"{path} [defaults]")
    defaults.setdefault("model", next(iter(models)))
    grid = raw.get("grid", {})
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise EnsembleError(f"{path} [grid]: {k} must be a non-empty list, got {v!r}")
        grid[k] = [_typed(k, x, f"{path} [grid]") for x in v]
    settings = []
    if grid:
        names = list(grid)
        for combo in itertools.product(*(grid[n] for n in names)):
            settings.append({**defaults, **dict(zip(names, combo))})
    for i, m in enumerate(raw.get("members", [])):
        settings.append({**defaults, **{k: _typed(k, v, f"{path} [[members]] #{i + 1}") for k, v in m.items()}})
    if not settings:
        settings.append(dict(defaults))
    members = []
    for i, s in enumerate(settings):
        where = f"{path}: member {i + 1}"
        if s["model"] not in models:
            raise EnsembleError(f"{where}: model {s['model']!r} is not in [models] ({', '.join(models)})")
        if s["thermostat"] not in THERMOSTATS:
            raise EnsembleError(f"{where}: thermostat {s['thermostat']!r}; expected one of {THERMOSTATS}")
        for k in ("steps", "stride", "tile"):
            if s[k] < 1:
                raise EnsembleError(f"{where}: {k} must be >= 1, got {s[k]}")
        for k in ("dt_fs", "temperature_K", "tau_fs", "max_force_ev_per_angstrom"):
            if s[k] is not None and not s[k] > 0:
                raise EnsembleError(f"{where}: {k} must be > 0, got {s[k]}")
        from .md.simulate import INTEGRATORS

        if s["integrator"] not in INTEGRATORS or (s["integrator"] in ("action", "direct")) != bool(s["action"]):
            raise EnsembleError(f"{where}: integrator {s['integrator']!r} with action {s['action']!r}; expected one of "
                                f"{INTEGRATORS}, an action model exactly for 'action' and 'direct'")
        if s["action"] and not Path(s["action"]).is_absolute():
            s["action"] = str((base / s["action"]).resolve())
        members.append(Member(model_path=models[s["model"]], init_store=ref, **s))
    ids = [m.id for m in members]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise EnsembleError(f"{path}: members {sorted(dup)} are listed twice (same settings)")
    return Ensemble(name=head.get("name", path.stem), source=str(path.resolve()), reference=ref,
                    members=tuple(members), window_fs=float(head.get("window_fs", 100.0)), models=models,
                    checkpoint_every=checkpoint_every, cluster=cluster)


# --------------------------------------------------------------------------- checks before running


def check_transfer(model, member: Member, init_box: np.ndarray) -> None:
    """Refuse a tiled box the model's invariants do not transfer to.

    A cutoff-mode model sees the same neighbourhoods in a tiled box as long as r_c is at most
    half its training box; a paper-mode model (all minimum-image pairs, long-range weights)
    sums over the whole box, so its invariants change with the box size.
    """
    if member.tile == 1:
        return
    if model.cutoff_angstrom is None:
        raise EnsembleError(f"member {member.id}: tile {member.tile} asks for a larger box, but model "
                            f"{member.model!r} is in paper mode (all minimum-image pairs, long-range weights): its "
                            "invariants depend on the box and do not transfer. Fit it with --cutoff, or use tile = 1")
    train = model.provenance.get("training_box_angstrom")
    box = np.asarray(train if train is not None else init_box, float)
    reach = max(model.cutoff_angstrom, getattr(model.angular, "cutoff_angstrom", 0.0) or 0.0)   # pair / angular
    if reach > 0.5 * box.min() + 1e-9:
        raise EnsembleError(f"member {member.id}: cutoff {reach:g} Å exceeds half the training box "
                            f"({0.5 * box.min():.3f} Å); the model does not transfer to a tiled box")


def validate(ens: Ensemble) -> None:
    """Check every member (models load, stores open, frames exist, species known, box transfer)."""
    from .io.store import open_trajectory
    from .model import load_model

    models = {label: load_model(p) for label, p in ens.models.items()
              if any(m.model == label for m in ens.members)}
    stores = {}
    for m in ens.members:
        if m.init_store not in stores:
            if m.init_store == "embedded":
                from .data import load_default
                stores[m.init_store] = load_default()
            else:
                stores[m.init_store] = open_trajectory(m.init_store)
        ds = stores[m.init_store]
        n = ds.sizes["frame"]
        if not -n <= m.init_frame < n:
            raise EnsembleError(f"member {m.id}: init_frame {m.init_frame} is outside the {n} frames of "
                                f"{m.init_store}")
        model = models[m.model]
        species = {str(s) for s in ds["species"].values}
        if not species <= set(model.species):
            raise EnsembleError(f"member {m.id}: {m.init_store} has species {sorted(species)}; model "
                                f"{m.model!r} knows {list(model.species)}")
        from .invariants import orthorhombic_box
        check_transfer(model, m, orthorhombic_box(ds["cell"].values))
        if m.action:
            from .md.action import load_action

            am = load_action(m.action)
            am.check_potential(m.model_path)
            if abs(am.dt_fs - m.dt_fs) > 1e-9 * m.dt_fs:
                raise EnsembleError(f"member {m.id}: {m.action} was fitted for {am.dt_fs:g} fs steps; dt_fs is {m.dt_fs:g}")


# --------------------------------------------------------------------------- one member (the task)


def _paths(out: Path, m: Member) -> dict[str, Path]:
    d = out / "members"
    return {"store": d / f"{m.id}.zarr", "stats": d / f"{m.id}.stats.zarr", "summary": d / f"{m.id}.json",
            "running": d / f".{m.id}.zarr.running", "lock": d / f".{m.id}.lock"}


def member_status(out: str | Path, m: Member) -> dict | None:
    """The recorded summary of a finished member (complete, or failed in its own dynamics), else None."""
    p = _paths(Path(out), m)
    if not (p["summary"].is_file() and p["store"].exists() and p["stats"].exists()):
        return None
    summary = json.loads(p["summary"].read_text())
    return summary if summary.get("member") == asdict(m) else None


def run_member(member: Member, out: str, window_fs: float = 100.0, checkpoint_every: int = 1000) -> dict:
    """Simulate, store and analyse one member; return its summary (a pure function of ``member``).

    The trajectory is written to ``members/.<id>.zarr.running`` with a checkpoint every
    ``checkpoint_every`` steps and renamed to ``members/<id>.zarr`` when the run ends, so a
    half-written store never appears under the final name. If a run of this member was
    interrupted (its worker died), it continues from that store's last checkpoint (the summary's
    ``resumed_from_step``; the store's ``resumed_from_steps`` lists every resume) and the
    trajectory is bitwise the one an uninterrupted run writes. A member whose simulation finished
    but whose worker died before its summary is analysed, not rerun; its summary's
    ``resumed_from_step`` is still the store's last resume. A run the model blows up keeps its
    store (status ``failed: ...``, frames up to the failure) and is analysed like any other. Any
    other error propagates (the runner records it).
    """
    import fcntl

    import dask

    lock = _paths(Path(out), member)["lock"]
    lock.parent.mkdir(parents=True, exist_ok=True)
    # one process at a time per member: a worker whose job was cancelled may still be writing until
    # the batch system kills it, while the scheduler already retries the member elsewhere; the
    # lock is released when its holder exits, however it exits
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        # serial inside the worker: dask computations here must not fan out to the cluster running us
        with dask.config.set(scheduler="synchronous"):
            return _run_member(member, Path(out), window_fs, checkpoint_every)


def _where_running() -> dict:
    """The dask worker and batch job this runs in (empty strings outside them), and the peak
    resident memory of this process so far (MB)."""
    try:
        from distributed import get_worker

        worker = str(get_worker().name)
    except (ImportError, ValueError):
        worker = os.environ.get("DASK_WORKER_NAME", "")
    from .cluster import process_peak_rss_mb

    job = next((os.environ[k] for k in ("SLURM_JOB_ID", "PBS_JOBID", "JOB_ID") if os.environ.get(k)), "")
    # peak memory of this process so far (what sizes a worker: [cluster] memory / cores)
    return {"worker": worker, "batch_job": job, "process_peak_rss_mb": process_peak_rss_mb()}


def _resume_point(store: Path, member: Member) -> int | None:
    """The step of the most advanced complete checkpoint (past step 0) of an interrupted run of
    ``member`` in ``store``, else None (nothing there, another run, or nothing to gain)."""
    import zarr

    from .md.output import CHECKPOINTS

    try:
        root = zarr.open_group(store, mode="r", use_consolidated=False)
        if root.attrs.get("ensemble_member") != json.dumps(asdict(member)):
            return None
        steps = [int(root[name].attrs["step"]) for name in CHECKPOINTS
                 if name in root and root[name].attrs.get("complete")]
    except Exception:  # nothing readable there (died while creating it): start afresh
        return None
    return max(steps) if steps and max(steps) > 0 else None


def _finished_store(store: Path, member: Member) -> str | None:
    """The status of ``store`` if it holds a finished run of ``member`` (complete or failed)."""
    import zarr

    try:
        attrs = zarr.open_group(store, mode="r").attrs
    except Exception:
        return None
    status = str(attrs.get("status", ""))
    if attrs.get("ensemble_member") == json.dumps(asdict(member)) and (status == "complete" or
                                                                        status.startswith("failed")):
        return status
    return None


def _last_resume(store: Path) -> int | None:
    """The step a finished store's run last continued from (None: it ran in one go)."""
    import zarr

    resumes = zarr.open_group(store, mode="r").attrs.get("resumed_from_steps", [])
    return int(resumes[-1]) if resumes else None


def _promote(running: Path, final: Path) -> None:
    """Rename a finished in-progress store to its final name (an older store there is replaced)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(running, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(running, final)


def _run_member(member: Member, out: Path, window_fs: float, checkpoint_every: int) -> dict:
    from .analysis import analyze, write_stats
    from .io.store import atomic_write_text, open_trajectory
    from .md import initial_state, simulate
    from .md.output import ResumeError
    from .md.simulate import SimulationError
    from .model import load_model

    paths = _paths(Path(out), member)
    paths["store"].parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    init = initial_state(member.init_store, frame=member.init_frame, temperature_K=member.temperature_K,
                         seed=member.seed, tile_n=member.tile)
    error, steps_done, atom_steps, resumed = None, None, None, None
    status = _finished_store(paths["store"], member)      # simulated before, but died before its summary
    if status is None:
        model = load_model(member.model_path)
        action = None
        if member.action:
            from .md.action import load_action

            action = load_action(member.action)
        running = paths["running"]
        resumed = _resume_point(running, member)
        if resumed is not None:
            import zarr

            root = zarr.open_group(running, mode="r+")
            root.attrs["resumed_from_steps"] = list(root.attrs.get("resumed_from_steps", [])) + [resumed]
        def run(resume: bool):
            return simulate(model, init, steps=member.steps, dt_fs=member.dt_fs,
                            temperature_K=member.temperature_K if member.thermostat == "nose-hoover" else None,
                            stride=member.stride, tau_fs=member.tau_fs,
                            max_force_ev_per_angstrom=member.max_force_ev_per_angstrom, out=running,
                            write_forces=member.write_forces, checkpoint_every=checkpoint_every,
                            resume=resume, overwrite=True,
                            run_attrs={"ensemble_member": json.dumps(asdict(member))},
                            integrator=member.integrator, action=action)

        try:
            try:
                sim = run(resume=resumed is not None)
            except ResumeError:      # left by another version of the package: start the member afresh
                resumed = None
                sim = run(resume=False)
            status, steps_done, atom_steps = "complete", sim.steps_done, sim.atom_steps_per_s
        except SimulationError as exc:       # the model blew up: keep what was written, status failed
            status, error = "failed", str(exc)
        _promote(running, paths["store"])
    else:
        resumed = _last_resume(paths["store"])      # the summary still says where that run last continued
        if status != "complete":
            status, error = "failed", status.removeprefix("failed: ")
    if status == "complete" and steps_done is None:
        steps_done = member.steps
    sim_s = time.perf_counter() - t0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = analyze(open_trajectory(paths["store"]), window_fs=window_fs, source=str(paths["store"]))
        write_stats(stats, paths["stats"], overwrite=True)
    summary = {"member": asdict(member), "id": member.id, "status": status, "error": error,
               "steps_done": steps_done, "resumed_from_step": resumed, "atoms": int(init.positions.shape[0]),
               "simulate_s": sim_s, "analyze_s": time.perf_counter() - t0 - sim_s,
               "seconds": time.perf_counter() - t0, "atom_steps_per_s": atom_steps,
               "warnings": sorted({str(w.message) for w in caught}),
               **_where_running(), "ensemble_version": __version__}
    atomic_write_text(paths["summary"], json.dumps(summary, indent=1) + "\n")
    return summary


# --------------------------------------------------------------------------- the ensemble


@dataclass
class Progress:
    total: int
    skipped: int = 0
    done: int = 0
    failed: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def line(self, running: int) -> str:
        finished = self.done + self.failed
        elapsed = time.perf_counter() - self.t0
        left = self.total - self.skipped - finished
        eta = f"{elapsed / finished * left:.0f} s" if finished else "?"
        return (f"members: {self.done + self.skipped} done ({self.skipped} skipped), {running} running, "
                f"{self.failed} failed, {left} left; elapsed {elapsed:.0f} s, ETA {eta}")


def run_ensemble(ens: Ensemble, out: str | Path, client, *, retry_failed: bool = False,
                 report: Callable[[str], None] | None = None) -> list[dict]:
    """Run every member not yet finished on ``client``; return all members' summaries.

    Checks every member (models, stores, species, box transfer) before anything runs. A
    member whose task raises is recorded with ``status = "error"`` and its message; the
    others go on. Members that failed in their own dynamics are rerun only with
    ``retry_failed``.
    """
    from distributed import as_completed

    report = report or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out)
    if ens.reference == "embedded" or any(m.init_store == "embedded" for m in ens.members):
        raise EnsembleError("resolve the embedded reference first (ensemble.runner.resolve_embedded)")
    validate(ens)
    from .io.store import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    manifest = {"schema": "ensemble.run/1", "name": ens.name, "config": ens.source, "reference": ens.reference,
                "window_fs": ens.window_fs, "members": [dict(asdict(m), id=m.id) for m in ens.members],
                "created_by": f"ensemble {__version__} run"}
    atomic_write_text(out / "ensemble.json", json.dumps(manifest, indent=1) + "\n")

    results: dict[str, dict] = {}
    todo = []
    for m in ens.members:
        prev = member_status(out, m)
        if prev is not None and (prev["status"] == "complete" or not retry_failed):
            results[m.id] = dict(prev, skipped=True)
        else:
            todo.append(m)
    prog = Progress(total=len(ens.members), skipped=len(results))
    report(prog.line(0))
    interrupted = [m for m in todo if _resume_point(_paths(out, m)["running"], m) is not None]
    if interrupted:
        report(f"{len(interrupted)} interrupted member(s) continue from their last checkpoint")
    futures = {client.submit(run_member, m, str(out), ens.window_fs, ens.checkpoint_every, key=m.key, pure=False): m
               for m in todo}
    last = 0.0
    for fut in as_completed(list(futures)):
        m = futures[fut]
        try:
            res = fut.result()
        except Exception as exc:  # the task raised: record it, go on with the others
            res = {"member": asdict(m), "id": m.id, "status": "error", "error": f"{type(exc).__name__}: {exc}"}
        results[m.id] = res
        if res.get("resumed_from_step"):
            report(f"member {m.id} continued from its checkpoint at step {res['resumed_from_step']}")
        if res["status"] == "complete":
            prog.done += 1
        else:
            prog.failed += 1
            report(f"member {m.id} {res['status']}: {res['error']}")
        running = sum(1 for f in futures if not f.done())
        if time.perf_counter() - last > 2.0 or running == 0:
            report(prog.line(min(running, _n_workers(client))))
            last = time.perf_counter()
    for f in futures:
        f.release()
    for p in (out / "members").glob(".*.partial-*"):      # left by workers that died mid-member
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for m in ens.members:                                  # every task has ended: nobody holds a lock
        if results[m.id]["status"] != "error":
            _paths(out, m)["lock"].unlink(missing_ok=True)
    return [results[m.id] for m in ens.members]


def _n_workers(client) -> int:
    try:
        return max(1, len(client.scheduler_info()["workers"]))
    except Exception:  # scheduler gone: the count is only for the progress line
        return 1


def resolve_embedded(ens: Ensemble, directory: str | Path) -> Ensemble:
    """Replace the reference ``"embedded"`` by a store unpacked into ``directory`` (once)."""
    if ens.reference != "embedded":
        return ens
    from .data import write_default_store
    store = Path(directory) / "reference.zarr"
    if not store.exists():
        write_default_store(store)
    members = tuple(replace(m, init_store=str(store)) if m.init_store == "embedded" else m for m in ens.members)
    return replace(ens, reference=str(store), members=members)


# --------------------------------------------------------------------------- aggregation


def reference_stats(ens: Ensemble, out: str | Path):
    """Statistics of the ensemble's reference store, computed once into ``OUT/reference.stats.zarr``."""
    from .analysis import analyze, open_stats, write_stats
    from .io.store import open_trajectory

    path = Path(out) / "reference.stats.zarr"
    if not path.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            write_stats(analyze(open_trajectory(ens.reference), window_fs=ens.window_fs, source=ens.reference), path)
    return open_stats(path)


def aggregate(ens: Ensemble, out: str | Path, summaries: list[dict], *, n_blocks: int = 8):
    """The members' statistics (those that produced any) merged into one Dataset with a ``member``
    dimension, and the reference's statistics: ``(aggregate, reference)``. Data only: the
    tables and figures are drawn by :func:`ensemble.report.report_ensemble`."""
    from .analysis import aggregate_members, open_stats

    out = Path(out)
    stats, meta = {}, {}
    for s in summaries:
        m = Member(**s["member"])
        p = _paths(out, m)["stats"]
        if s["status"] in ("complete", "failed") and p.exists():
            stats[m.id] = open_stats(p)
            meta[m.id] = {"model": m.model, "temperature_K": m.temperature_K, "tile": m.tile, "seed": m.seed,
                          "status": s["status"]}
    if not stats:
        raise EnsembleError(f"{out}: no member produced statistics; see members/*.json for the errors")
    ref = reference_stats(ens, out)
    agg = aggregate_members(stats, meta, reference=ref, n_blocks=n_blocks)
    agg.attrs.update(ensemble=ens.name, config=ens.source, reference=ens.reference)
    return agg, ref
