"""Command line, in the order of the flow: ``ensemble ingest | info | export | reference | fit | evaluate |
fit-action | simulate | compare-dynamics | analyze | report | run | demo | bench``.

Configuration (TOML files, options) is read here, at the edge, checked, and passed on as plain
arguments; every user-facing error (:class:`ensemble.errors.UserError`) is caught once in
:func:`main` and printed as one line (exit 2; 3 when the dynamics of a run failed). ``ensemble
demo`` is :func:`ensemble.demo.run_demo`; ``python -m ensemble`` is the same program.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

from . import __version__
from .errors import DynamicsError, UsageError, UserError
from .files import check_output_parent, refuse_aliasing, refuse_existing




def _parse_masses(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    out = {}
    for item in text.split(","):
        label, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[label.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--masses expects LABEL=AMU[,LABEL=AMU...], got {item!r}") from None
    return out


def _progress(label: str, elapsed: bool = False):
    last = [0.0]
    tty = sys.stderr.isatty()
    start = time.monotonic()

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < 0.5 and done < total:
            return
        last[0] = now
        end = "\n" if done >= total or not tty else ""
        took = f" ({now - start:.1f} s)" if elapsed else ""
        sys.stderr.write(f"{chr(13) if tty else ''}{label}: {done}/{total} frames{took}{end}")   # \r on a tty
        sys.stderr.flush()

    return report


def _print_ingest(report, out: Path) -> None:
    from .io import format_summary, open_trajectory, summarize

    print(f"wrote {out}: {report.frames} frames x {report.natoms} atoms "
          f"({report.bytes_read / 1e6:.1f} MB read in {report.seconds:.2f} s, {report.mb_per_s:.0f} MB/s)")
    for note in report.notes:
        print(f"note: {note}")
    if report.kinetic_energy_max_rel_error is not None:
        print(f"kinetic energy vs CP2K .ener: max relative error {report.kinetic_energy_max_rel_error:.2e}")
    print(format_summary(summarize(open_trajectory(out)), str(out)))


def _cluster(args, table: dict | None, where: str, log_directory: Path | None = None):
    """The cluster to run on: the config's ``[cluster]`` table, overridden by --cluster, --scheduler,
    --workers and --jobs (checked before anything is written or started)."""
    from dataclasses import replace

    from .cluster import JOB_QUEUES, cluster_spec

    spec = cluster_spec(table, where=where, kind=args.cluster, scheduler=args.scheduler, workers=args.workers,
                        jobs=args.jobs)
    if spec.kind in JOB_QUEUES and spec.log_directory is None and log_directory is not None:
        spec = replace(spec, log_directory=str(log_directory))
    return spec


def cmd_ingest(args) -> int:
    out = Path(args.out)
    cell = None
    if args.cell:
        if len(args.cell) not in (3, 9):
            raise UsageError("--cell takes 3 lengths or 9 numbers (cell vectors a, b, c), in Å")
        import numpy as np

        cell = np.array(args.cell, dtype=float)
        cell = np.diag(cell) if cell.size == 3 else cell.reshape(3, 3)
    masses = _parse_masses(args.masses)
    src = Path(args.source)
    inputs = {"SOURCE": src, "--input": args.input}
    folder, prefix = (src, "") if src.is_dir() else (src.parent, src.name.removesuffix("-pos-1.xyz"))
    if folder.is_dir():     # a run directory or dir/PROJECT: every file the reader may open is an input
        inputs.update({f"SOURCE file {f.name}": f for f in folder.iterdir() if f.name.startswith(prefix)})
    refuse_aliasing({"--out": out}, inputs, containers=["SOURCE"] if src.is_dir() else [])
    fmt = args.format
    if fmt == "auto":
        fmt = "cp2k" if (src.is_dir() or src.name.endswith("-pos-1.xyz")
                         or Path(str(src) + "-pos-1.xyz").exists()) else "ase"
    if fmt == "cp2k":
        from .io.cp2k import ingest_cp2k

        report = ingest_cp2k(src, out, cell=cell, masses=masses, input_file=args.input,
                             chunk_frames=args.chunk_frames, overwrite=args.overwrite,
                             progress=_progress("ingest"))
    else:
        from .io.ase import ingest_ase

        report = ingest_ase(src, out, format=args.ase_format, dt_fs=args.dt_fs, masses=masses, cell=cell,
                            chunk_frames=args.chunk_frames, overwrite=args.overwrite)
    _print_ingest(report, out)
    return 0


def cmd_info(args) -> int:
    from .io import format_summary, open_trajectory, summarize

    ds = open_trajectory(args.store)
    s = summarize(ds)
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(format_summary(s, args.store))
        ref = ds.attrs.get("reference_run")
        if ref:
            print(f"made by       ensemble reference {Path(ref['config']).name}: {ref['n_molecules']} H2O, "
                  f"seed {ref['seed']}, {ref['equilibration_steps']} equilibration steps "
                  f"({ref['equilibration']}), {ref['production_steps']} production steps, {ref['cp2k']}")
    return 0


def cmd_export(args) -> int:
    from .io.ase import write_extxyz

    refuse_aliasing({"--out": args.out}, {"STORE": args.store})
    path = write_extxyz(args.store, args.out, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def cmd_reference(args) -> int:
    from .reference import run_reference

    report = run_reference(args.config, args.out, steps=args.steps, workdir=args.workdir, cp2k=args.cp2k,
                           mpi_ranks=args.np, overwrite=args.overwrite)
    _print_ingest(report, Path(args.out))
    return 0


def cmd_demo(args) -> int:
    """The whole pipeline on the embedded data (:func:`ensemble.demo.run_demo`), printed."""
    from .demo import run_demo

    out = Path(args.out)
    spec = _cluster(args, None, "ensemble demo")
    res = run_demo(out, fit_stride=args.fit_stride, steps=args.steps, cluster_spec=spec, progress=print)
    print((out / "summary.md").read_text())
    print(f"[5/5] report of the reference ({res.reference_temperature_K:.0f} K) vs {', '.join(res.report_labels)} "
          f"({', '.join(m.id for m in res.compared)}): {out / 'report'}")
    print((out / "report" / "scorecard.md").read_text().split("\n\nFigures")[0])
    print(f"demo finished in {res.seconds:.0f} s: {_outcome(res.summaries, res.summary)}; "
          f"see {out / 'summary.md'}, {out / 'figures'}, {out / 'report'}")
    return 0


def cmd_fit(args) -> int:
    from .cluster import open_client
    from .fit.pipeline import format_table, load_fit_config, plot_selection

    keep = args.keep
    if keep is not None and keep not in ("all", "best"):
        try:
            keep = int(keep)
        except ValueError:
            raise UsageError(f"--keep {keep!r}: expected an integer, 'best' or 'all'") from None
    overrides = {"kind": args.kind, "keep": keep, "frame_stride": args.frame_stride,
                 "chunk_frames": args.chunk_frames, "quadratic": args.quadratic, "split_seed": args.split_seed,
                 "angular": "default" if args.angular else None, "prior": False if args.no_prior else None}
    if args.cutoff is not None:
        overrides.update(neighbour_mode="cutoff", cutoff_angstrom=args.cutoff)
    if args.ridge is not None:
        overrides["ridge"] = args.ridge
    if args.ridge_scan is not None:
        overrides["ridge_scan"] = args.ridge_scan
    try:
        cfg = load_fit_config(args.config, **overrides)
        cfg, screen = _screen_settings(args, cfg)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    from .fit.pipeline import fit_stores, open_fit_stores

    out = Path(args.out or f"model-{cfg.kind}.json")
    png = out.with_name(out.stem + "-selection.png")
    inputs = {"--config": args.config}
    for label, paths in (("STORE", args.store), ("--validation", args.validation), ("--test", args.test)):
        inputs.update({label if len(paths) == 1 else f"{label} {i + 1}": p for i, p in enumerate(paths)})
    refuse_aliasing({"--out": out, "the selection plot": png}, inputs)
    refuse_existing([out, png], args.overwrite)
    check_output_parent(out)
    try:
        open_fit_stores(args.store, cfg, validation=args.validation, test=args.test)  # before any cluster starts
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    table = None
    if args.config:
        from .configfile import read_toml

        table = read_toml(args.config, "fit config", UsageError).get("cluster")
    spec = _cluster(args, table, f"{args.config} [cluster]" if table is not None else "ensemble fit",
                    out.with_name(out.stem + "-cluster-logs"))
    with open_client(spec=spec):
        try:
            report = fit_stores(args.store, cfg, validation=args.validation, test=args.test,
                                progress=lambda m: print(m, file=sys.stderr),
                                frame_progress=_progress("Gram reduction", elapsed=True))
        except ValueError as exc:     # stores that do not fit together or with the settings
            raise UsageError(str(exc)) from None
    if screen is not None:
        from .screen import screen_fit

        report = screen_fit(report, args.store, cfg, screen, own_validation=not args.validation,
                            own_test=not args.test, progress=lambda m: print(m, file=sys.stderr))
    report.model.save(out)            # atomically, after every check
    png = plot_selection(report, png)
    print(format_table(report, cfg.kind))
    print(f"wrote {out} and {png}")
    return 0


def cmd_evaluate(args) -> int:
    """``ensemble evaluate MODEL STORE...``: the model's force (and energy) errors on stores, checked
    before a cluster starts; ``--out`` JSON written atomically."""
    import tempfile

    from .analysis import split_frame_range
    from .cluster import open_client
    from .evaluate import evaluate_store, format_summary, summarize
    from .io import open_trajectory
    from .io.store import atomic_write_text
    from .model import load_model

    model = load_model(args.model)
    out = Path(args.out) if args.out else None
    if out is not None:
        inputs = {"MODEL": args.model} | {f"STORE {i + 1}": split_frame_range(s)[0] for i, s in enumerate(args.store)}
        refuse_aliasing({"--out": out}, inputs)
        refuse_existing([out], args.overwrite)
        check_output_parent(out)
    if args.chunk_frames is not None and args.chunk_frames < 1:
        raise UsageError(f"--chunk-frames must be >= 1, got {args.chunk_frames}")
    jobs = []
    scratch = tempfile.TemporaryDirectory(prefix="ensemble-evaluate-")
    try:
        for spec_ in args.store:
            path, frames = split_frame_range(spec_)
            ds = open_trajectory(_as_store(path, Path(scratch.name)))
            jobs.append(_evaluation_job(model, spec_, path, frames, ds, args.split))
        spec = _cluster(args, None, "ensemble evaluate")
        with open_client(spec=spec):
            results = [evaluate_store(model, ds, path=path, frames=index, chunk_frames=args.chunk_frames)
                       for path, ds, index in jobs]
    finally:
        scratch.cleanup()
    kind = "many-body" if model.angular is not None else "pair"
    print(f"model {args.model}: {model.kind}, {kind} ({model.spec.n_features} features per species), "
          f"species {' '.join(model.species)}; errors of forces ({'eV/Å' if model.kind == 'conservative' else 'mass x accelerations, eV/Å'}), "
          "relative RMSE as paper eq. 5.2")
    record = {"format": "ensemble.evaluation/1", "model": str(Path(args.model).resolve()),
              "model_digest": model.content_digest(), "kind": model.kind, "split": args.split, "stores": []}
    where = f" ({args.split} split of the fit)" if args.split else ""
    for (path, ds, index), err in zip(jobs, results):
        summary = summarize(err)
        print(format_summary(summary, f"{path}{where}"))
        record["stores"].append({"path": str(Path(path).resolve()), "target": err.attrs["target"],
                                 "frame_indices": [int(i) for i in index], **summary})
    if len(results) > 1:
        pooled = summarize(results)
        print(format_summary(pooled, "all stores"))
        record["all"] = pooled
    if out is not None:
        atomic_write_text(out, json.dumps(record, indent=1, allow_nan=False))
        print(f"wrote {out}")
    return 0


def _as_store(path: str, scratch: Path) -> Path:
    """A trajectory store for ``ensemble evaluate``: the path itself, or an ASE-readable file
    (extxyz with forces, ...) ingested into ``scratch`` (read, checked, and dropped afterwards)."""
    p = Path(path)
    if not p.is_file():
        return p
    from .io.ase import ingest_ase

    out = scratch / f"{len(list(scratch.iterdir()))}-{p.name}.zarr"
    report = ingest_ase(p, out)
    print(f"read {p} through ASE: {report.frames} frames", file=sys.stderr)
    return out


def _evaluation_job(model, spec_: str, path: str, frames, ds, split):
    """(path, dataset, frame indices) of one STORE argument of ``ensemble evaluate``, checked."""
    import numpy as np

    from .evaluate import EvaluationError, check_store, fit_split

    check_store(model, ds, path)
    if split and frames is not None:
        raise UsageError(f"{spec_!r}: give a frame range or --split, not both")
    if split:
        index = fit_split(model, ds, path, split)
        if index.size == 0:
            raise EvaluationError(f"{path}: the fit's {split} split has no frames of this store")
    else:
        index = np.arange(ds.sizes["frame"])[frames if frames is not None else slice(None)]
        if index.size == 0:
            raise UsageError(f"{spec_!r}: the frame range selects no frame of {ds.sizes['frame']}")
    return path, ds, index


def _screen_settings(args, cfg):
    """``(fit config, screen settings or None)`` for ``ensemble fit``: the stability screen
    (:mod:`ensemble.screen`) is on by default for the many-body model (conservative with angular
    invariants); ``--screen`` / ``--no-screen`` or ``[screen] enabled`` decide otherwise. With a
    screen, the fit solves a ridge scan (the config's ``ridge_scan``, else its ridge and the default
    ladder above it); settings come from the config's ``[screen]`` table and the options."""
    from .screen import ScreenSettings, screened_by_default, with_ridge_scan

    table = {}
    if args.config:
        from .configfile import read_toml

        table = dict(read_toml(args.config, "fit config", UsageError).get("screen", {}))
    known = {"enabled", "picoseconds", "temperature_K", "max_heating", "block_fs", "dt_fs", "tau_fs", "seed"}
    if set(table) - known:
        raise UsageError(f"{args.config}: unknown keys in [screen]: {sorted(set(table) - known)}; known: {sorted(known)}")
    enabled = table.pop("enabled", screened_by_default(cfg))
    if args.screen is not None:
        enabled = args.screen
    if not enabled:
        return cfg, None
    if args.screen_ps is not None:
        table["picoseconds"] = args.screen_ps
    if args.screen_temperature_K is not None:
        table["temperature_K"] = args.screen_temperature_K
    settings = ScreenSettings(**table)
    return with_ridge_scan(cfg), settings


def cmd_fit_action(args) -> int:
    from .cluster import open_client
    from .fit.action import check_action_inputs, distill, fit_action, format_action_table, require_conservative
    from .md.action import default_features
    from .model import load_model

    model = load_model(args.model)          # clear errors before any work and before a cluster starts
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} already exists; choose another --out or pass --overwrite")
    if args.dt_fs <= 0:
        raise UsageError(f"--dt-fs must be > 0, got {args.dt_fs}")
    require_conservative(model, args.model)
    features = default_features(model.species, args.cutoff) if args.cutoff else None
    store = args.store
    prov = {}
    if args.distill_ps:
        store = Path(args.distill_out or out.with_suffix(".distill.zarr"))
        stride = args.distill_stride_fs or args.dt_fs
        lag = args.dt_fs / stride
        if abs(lag - round(lag)) > 1e-6 * lag or round(lag) < 1:
            raise UsageError(f"--dt-fs {args.dt_fs:g} must be a whole number of --distill-stride-fs {stride:g} "
                             f"(the distillation run's frame interval); got {lag:.4g}")
        print(f"distillation: {args.distill_ps:g} ps of velocity Verlet (0.5 fs) with {args.model} from {args.store}, "
              f"frames every {stride:g} fs -> {store}", file=sys.stderr)
        distill(args.model, args.store, store, ps=args.distill_ps, stride_fs=stride, overwrite=args.overwrite)
        prov = {"distilled_from": str(args.store), "distill_ps": args.distill_ps}
    else:
        from .io import open_trajectory

        check_action_inputs(open_trajectory(store), model, dt_fs=args.dt_fs, kind=args.kind)
    with open_client(args.scheduler, args.workers):
        rep = fit_action(store, args.model, dt_fs=args.dt_fs, kind=args.kind, features=features,
                         pair_stride=args.pair_stride, chunk_pairs=args.chunk_pairs, ridge=args.ridge,
                         progress=lambda m: print(m, file=sys.stderr), provenance=prov)
    rep.action.save(out)
    print(format_action_table(rep.action))
    print(f"wrote {out}")
    return 0


def cmd_compare_dynamics(args) -> int:
    import json as _json

    from .diagnostics import compare_runs, format_comparison

    c = compare_runs(args.run, args.reference, n_blocks=args.blocks, skip_ps=args.skip_ps)
    print(format_comparison(c))
    if args.json:
        from .io.store import atomic_write_text

        atomic_write_text(args.json, _json.dumps(c, indent=1, default=float) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_simulate(args) -> int:
    from .md import initial_state, simulate
    from .model import load_model

    # the run store never is, contains or lies inside an input (--init X.zarr:10 --out X.zarr --overwrite)
    refuse_aliasing({"--out": args.out}, {"--init": str(args.init).partition(":")[0], "--model": args.model,
                                          "--action": args.action})
    check_output_parent(args.out)
    model = load_model(args.model)
    action = None
    if args.action:
        from .md.action import load_action

        action = load_action(args.action)
        action.check_potential(args.model)
    elif args.integrator in ("action", "direct"):
        raise UsageError(f"--integrator {args.integrator} needs --action A.json (from `ensemble fit-action`)")
    options = {k: v for k, v in (("tol_angstrom", args.tol_angstrom), ("max_iter", args.max_iter),
                                 ("energy_every", args.energy_every)) if v is not None}
    if options and args.integrator not in ("action", "midpoint"):
        raise UsageError("--tol-angstrom, --max-iter and --energy-every apply to --integrator action / midpoint")
    for flag, key in (("inner_steps", "inner_steps"), ("split", "split"), ("split_angstrom", "split_angstrom")):
        if getattr(args, flag) is not None:
            if args.integrator != "respa":
                raise UsageError(f"--{flag.replace('_', '-')} applies to --integrator respa")
            options[key] = getattr(args, flag)
    try:
        init = initial_state(args.init, temperature_K=args.init_temperature_K if args.seed is not None else None,
                             seed=args.seed, tile_n=args.tile)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    temperature_K = None if args.nve else args.temperature_K
    if not args.nve and temperature_K is None:
        raise UsageError("give --temperature-K for NVT (Nose-Hoover chain) or --nve")
    tty = sys.stderr.isatty()
    last = [0.0]

    def progress(step, total, elapsed):
        if elapsed - last[0] < (0.5 if tty else 15.0) and step < total:
            return
        last[0] = elapsed
        rate = step_rate = (step - start[0]) / elapsed if elapsed > 0 else 0.0
        eta = (total - step) / step_rate if step_rate > 0 else float("inf")
        msg = f"step {step}/{total}  {rate:.1f} steps/s  {rate * len(init.species):.3g} atom-steps/s  ETA {eta:.0f} s"
        sys.stderr.write(f"\r{msg}   " if tty else msg + "\n")

    start = [0]
    try:
        summary = simulate(model, init, steps=args.steps, dt_fs=args.dt_fs, temperature_K=temperature_K,
                           stride=args.stride, tau_fs=args.tau_fs, chain_length=args.chain_length,
                           max_force_ev_per_angstrom=args.max_force, remove_com=not args.keep_com,
                           checkpoint_every=args.checkpoint_every, out=args.out, resume=args.resume,
                           overwrite=args.overwrite, progress=progress, integrator=args.integrator, action=action,
                           action_options=options)
    except ValueError as exc:       # settings that do not fit the model / store / earlier run
        raise UsageError(str(exc)) from None
    if tty:
        sys.stderr.write("\n")
    sp = ", ".join(f"{k} {v:.1f} K" for k, v in summary.mean_temperature_species_K.items())
    print(f"wrote {summary.out}: {summary.steps_done} steps, {summary.frames} frames, {summary.status}")
    print(f"mean temperature {summary.mean_temperature_K:.1f} K ({sp}); clipped atom-steps "
          f"{summary.clipped_atom_steps} ({summary.clip_fraction:.2%}); {summary.atom_steps_per_s:.3g} atom-steps/s")
    from .diagnostics import run_diagnostics

    d = run_diagnostics(summary.out)
    line = [f"{summary.steps_done * args.dt_fs / 1000 / summary.seconds:.3g} simulated ps per second"]
    if "energy_drift_meV_per_atom_ps" in d:
        line.append(f"energy drift {d['energy_drift_meV_per_atom_ps']:+.4f} meV/atom/ps")
    if "equipartition_gap" in d:
        line.append(f"|T_H - T_O| / T = {d['equipartition_gap']:.3f}")
    if "iterations_per_step" in d:
        line.append(f"fixed-point iterations per step {d['iterations_per_step']['mean']:.2f} "
                    f"(max {d['iterations_per_step']['max']})")
    print("; ".join(line))
    return 0


def cmd_analyze(args) -> int:
    from .analysis import analyze, open_stats, split_frame_range, stats_summary_json, write_stats
    from .io import open_trajectory
    from .io.store import StoreError

    path, frames = split_frame_range(args.store)
    refuse_aliasing({"--out": args.out}, {"STORE": path})
    if args.frames and frames is not None:
        raise UsageError(f"give the frame range once: {args.store!r} already has one, and --frames {args.frames!r}")
    ds = open_trajectory(path)
    if Path(args.out).exists() and not args.overwrite:
        raise StoreError(f"{args.out} already exists; choose another --out or pass --overwrite")
    frames = frames if frames is not None else _frame_slice(args.frames, ds.sizes["frame"])
    if len(range(ds.sizes["frame"])[frames]) < 2:
        raise UsageError(f"{args.store}: the frame range selects {len(range(ds.sizes['frame'])[frames])} of "
                         f"{ds.sizes['frame']} frames; need at least 2")
    stats = analyze(ds.isel(frame=frames), window_fs=args.window_fs, pad=args.pad, rdf_max=args.rdf_max,
                    rdf_bin=args.rdf_bin, bond_max_angstrom=args.bond_max, source=str(args.store))
    t0 = time.perf_counter()
    write_stats(stats, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out} ({stats.sizes['frame']} frames in {time.perf_counter() - t0:.1f} s); "
          f"spectra {stats.attrs['spectra']}")
    print(stats_summary_json(open_stats(args.out)))
    return 0


def _frame_slice(text: str | None, n: int) -> slice:
    if not text:
        return slice(None)
    try:
        parts = [int(p) if p else None for p in text.split(":")]
        if len(parts) not in (2, 3):
            raise ValueError
    except ValueError:
        raise UsageError(f"--frames {text!r}: expected START:STOP[:STRIDE] (frame indices)") from None
    sl = slice(*parts)
    if len(range(n)[sl]) < 2:
        raise UsageError(f"--frames {text!r} selects {len(range(n)[sl])} of {n} frames; need at least 2")
    return sl


def cmd_report(args) -> int:
    from .analysis import split_frame_range
    from .report import write_report

    refuse_aliasing({"--out": args.out}, {label: split_frame_range(spec)[0] for label, spec in
                                          [("REFERENCE", args.reference)] + [(f"MODEL {m}", m) for m in args.models]})
    cards = write_report(args.reference, args.models, args.out, overwrite=args.overwrite, n_blocks=args.blocks,
                         window_fs=args.window_fs, pad=args.pad, labels=args.label)
    print((Path(args.out) / "scorecard.md").read_text())
    print(f"wrote {args.out}/scorecard.json, scorecard.md and figures; {len(cards)} model(s) compared")
    return 0


def cmd_run(args) -> int:
    from .cluster import open_client
    from .report import report_ensemble
    from .runner import load_ensemble, resolve_embedded, run_ensemble, validate

    ens = load_ensemble(args.config)
    spec = _cluster(args, ens.cluster, f"{args.config} [cluster]", Path(args.out) / "cluster-logs")
    validate(ens)                    # every member checked before anything is written or a cluster starts
    out = Path(args.out)
    written = {f"--out {name}": out / name for name in ("ensemble.json", "members", "aggregate.zarr", "summary.md",
                                                        "summary.json", "figures", "reference.zarr",
                                                        "reference.stats.zarr", "cluster-logs")}
    inputs = {"CONFIG": args.config, **{f"model {k}": v for k, v in ens.models.items()},
              **{f"member {m.id} action": m.action for m in ens.members if getattr(m, "action", None)}}
    if ens.reference != "embedded":
        inputs["reference"] = ens.reference
    refuse_aliasing(written, inputs)
    refuse_aliasing({"--out": out}, {k: v for k, v in inputs.items() if k != "CONFIG" and not Path(v).is_file()})
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; an ensemble writes a directory")
    check_output_parent(out)
    with open_client(spec=spec) as client:       # an unreachable cluster fails before anything is written
        ens = resolve_embedded(ens, args.out)
        print(f"ensemble {ens.name}: {len(ens.members)} members, reference {ens.reference}", file=sys.stderr)
        summaries = run_ensemble(ens, args.out, client, retry_failed=args.retry_failed)
    doc = report_ensemble(ens, args.out, summaries)
    print((Path(args.out) / "summary.md").read_text())
    print(f"{_outcome(summaries, doc)}; wrote {args.out}/aggregate.zarr, summary.md, summary.json, figures/")
    return 0


def _outcome(summaries: list[dict], doc: dict) -> str:
    done = sum(s["status"] == "complete" for s in summaries)
    failed = sum(g["failed"] for g in doc["groups"])
    return (f"{done} of {len(summaries)} members complete, {failed} failed a stability criterion "
            "(blow-up, dissociation or structure drift)")


def cmd_bench(args) -> int:
    from . import bench

    if args.what == "ingest":
        bench.bench_ingest(size_mb=args.size_mb, workdir=args.workdir)
    elif args.what == "md":
        if args.action:
            if not args.model:
                raise UsageError("--action needs --model (the conservative model the maps were fitted for)")
            bench.bench_action(args.model, args.action, ps=args.action_ps)
        else:
            bench.bench_md(steps=args.steps, model_path=args.model, cutoff_angstrom=args.cutoff)
    elif args.what == "runner":
        bench.bench_runner(members=args.members, steps=args.steps, model_path=args.model, workdir=args.workdir)
    elif args.scale:
        bench.bench_gram_scale(args.scale, args.workdir, model_path=args.model, memory_limit=args.memory_limit,
                               n_weights=args.weights)
    else:
        bench.bench_gram(frames=args.frames, long_factor=args.long_factor, workdir=args.workdir)
    return 0


def _cluster_args(s, table: str | None) -> None:
    from .cluster import KINDS

    default = f"default: {table}, else local" if table else "default: local"
    s.add_argument("--cluster", choices=KINDS, help=f"where the dask workers run ({default}); slurm / pbs / sge "
                   "submit batch jobs through dask-jobqueue (pip install 'ensemble[cluster]')")
    s.add_argument("--scheduler", metavar="ADDRESS", help="an existing dask scheduler (tcp://HOST:PORT)")
    s.add_argument("--workers", type=int, help="local worker processes (default: one per core)")
    s.add_argument("--jobs", type=int, help="batch jobs kept running (slurm / pbs / sge; instead of the adaptive "
                   "minimum_jobs / maximum_jobs of [cluster])")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ensemble", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"ensemble {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("ingest", help="CP2K output (or an ASE-readable trajectory) -> trajectory store")
    s.add_argument("source", help="run directory, project prefix (dir/PROJECT), -pos-1.xyz, or a trajectory file")
    s.add_argument("--out", required=True, help="zarr store to write")
    s.add_argument("--cell", type=float, nargs="+", metavar="L", help="3 box lengths or 9 cell numbers, Å")
    s.add_argument("--masses", help="LABEL=AMU,... overriding CP2K's default masses")
    s.add_argument("--input", help="CP2K input or restart file holding the cell / masses")
    s.add_argument("--chunk-frames", type=int, help="frames per zarr chunk (default: 4 MiB chunks of positions)")
    s.add_argument("--format", choices=["auto", "cp2k", "ase"], default="auto")
    s.add_argument("--ase-format", help="format name passed to ase.io (e.g. extxyz, traj)")
    s.add_argument("--dt-fs", type=float, help="time between frames (fs) for ASE files without info['time']")
    s.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("info", help="summary of a trajectory store")
    s.add_argument("store")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("export", help="trajectory store -> extended xyz")
    s.add_argument("store")
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("reference", help="build a water box, run CP2K (equilibrate + produce), ingest")
    s.add_argument("config", help="reference config, e.g. configs/reference/fist-spcfw-128.toml")
    s.add_argument("--steps", type=int, help="production steps (default: the config's)")
    s.add_argument("--out", required=True, help="trajectory store to write")
    s.add_argument("--workdir", help="where CP2K runs (default OUT.cp2k); rerun to resume")
    s.add_argument("--cp2k", help="CP2K executable (default: cp2k.psmp / cp2k.popt on PATH)")
    s.add_argument("--np", type=int, help="MPI ranks (mpirun -np N cp2k.popt)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_reference)

    s = sub.add_parser("fit", help="fit agent losses (or the conservative model) on trajectory stores / "
                                   "configuration sets")
    s.add_argument("store", nargs="+", help="stores to fit on (their Gram matrices add; time series are split "
                                            "along time, configuration sets by a seeded shuffle)")
    s.add_argument("--validation", action="append", default=[], metavar="STORE",
                   help="a store used only for validation (repeatable); the fit stores then train on their "
                        "validation share")
    s.add_argument("--test", action="append", default=[], metavar="STORE",
                   help="a store used only for testing (repeatable)")
    s.add_argument("--config", help="fit config TOML (default: the built-in defaults, see configs/fit.toml; "
                                    "many-body: configs/fit-manybody.toml)")
    s.add_argument("--kind", choices=["agent", "conservative"])
    s.add_argument("--out", help="model JSON to write (default model-KIND.json)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out model (and its selection plot)")
    s.add_argument("--cutoff", type=float, help="cutoff mode with this cutoff, Å (default: paper mode)")
    s.add_argument("--angular", action="store_true", help="add the default angular (three-body) invariants")
    s.add_argument("--quadratic", choices=["none", "pair", "pair+radial", "all"],
                   help="feature pairs with quadratic coefficients (default: pair)")
    s.add_argument("--no-prior", action="store_true", help="no short-range repulsion below the training distances")
    s.add_argument("--ridge", type=float, help="ridge on standardized columns (default 1e-10)")
    s.add_argument("--ridge-scan", help="ridges to solve on the same Gram, comma-separated (default with a screen: "
                                        "the ridge and 1e-8, 1e-6, 1e-5, 1e-4, 1e-3 above it)")
    s.add_argument("--screen", action=argparse.BooleanOptionalAction, default=None,
                   help="stability screen: short NVT of each ridge's model from the last training frame, the "
                        "least-regularised that holds the liquid is kept (default: on for --angular conservative)")
    s.add_argument("--screen-ps", type=float, help="screen length per candidate, ps (default 1)")
    s.add_argument("--screen-temperature-K", type=float,
                   help="screen temperature (default: the training frames' mean temperature)")
    s.add_argument("--split-seed", type=int, help="seed of the configuration-set shuffle (default 0)")
    s.add_argument("--keep", help="groups kept by backward elimination: a number (default 7), 'best' "
                                  "(lowest validation error) or 'all' (no elimination)")
    s.add_argument("--frame-stride", type=int, help="use every n-th frame")
    s.add_argument("--chunk-frames", type=int, help="frames per dask task")
    _cluster_args(s, "the fit config's [cluster] table")
    s.set_defaults(func=cmd_fit)

    s = sub.add_parser("evaluate", help="a fitted model's force (and energy) errors on stores it was not "
                       "fitted to, or on its fit's own validation / test frames")
    s.add_argument("model", help="model JSON from `ensemble fit`")
    s.add_argument("store", nargs="+", help="stores with forces (STORE or STORE:START:STOP[:STRIDE]); several are "
                   "reported one by one and pooled")
    s.add_argument("--split", choices=["train", "validation", "test"],
                   help="only the frames of this split of the model's own fit (the store must be one it was fitted on)")
    s.add_argument("--out", help="write the figures as JSON (per store, per species; frames evaluated)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    s.add_argument("--chunk-frames", type=int, help="frames per dask task (default: the store's chunks)")
    _cluster_args(s, None)
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("simulate", help="learning-based MD with a fitted model, streamed to a zarr store")
    s.add_argument("--model", required=True, help="model JSON from `ensemble fit`")
    s.add_argument("--init", required=True, help="STORE[:FRAME] to start from (default frame: the last)")
    s.add_argument("--steps", type=int, required=True)
    s.add_argument("--dt-fs", type=float, default=0.5)
    s.add_argument("--temperature-K", type=float, help="Nose-Hoover chain target (NVT)")
    s.add_argument("--nve", action="store_true", help="no thermostat")
    s.add_argument("--seed", type=int, help="redraw velocities from Maxwell-Boltzmann with this seed")
    s.add_argument("--init-temperature-K", type=float, default=300.0, help="temperature of redrawn velocities")
    s.add_argument("--tile", type=int, default=1, help="repeat the box n x n x n")
    s.add_argument("--stride", type=int, default=10, help="write a frame every n steps")
    s.add_argument("--tau-fs", type=float, default=100.0, help="thermostat time constant")
    s.add_argument("--chain-length", type=int, default=3)
    s.add_argument("--max-force", type=float, help="clip forces to this magnitude, eV/Å")
    s.add_argument("--keep-com", action="store_true", help="do not remove the initial centre-of-mass drift")
    s.add_argument("--integrator", choices=["verlet", "action", "midpoint", "direct", "respa"], default="verlet",
                   help="velocity Verlet (default); the learned long-step map (--action); the implicit midpoint "
                        "rule (the map without learned terms); the direct baseline predictor (--action); "
                        "multiple time stepping, the model's short-range part on a short inner step (respa)")
    s.add_argument("--inner-steps", type=int, help="respa: inner steps per --dt-fs step (default: inner steps of "
                                                    "<= 0.5 fs)")
    s.add_argument("--split", choices=["distance", "molecules"], help="respa: the fast part is the model cut off at "
                                                                     "--split-angstrom (distance, default) or its "
                                                                     "energy inside each molecule (molecules)")
    s.add_argument("--split-angstrom", type=float, help="respa: where the distance split cuts the model off "
                                                        "(default 4 Å, or where the model's own cutoff switch "
                                                        "begins if shorter), switched off over its outer half")
    s.add_argument("--action", help="action / direct model JSON from `ensemble fit-action` (its dt = --dt-fs)")
    s.add_argument("--tol-angstrom", type=float, help="fixed-point tolerance of the map, Å (default 1e-9)")
    s.add_argument("--max-iter", type=int, help="fixed-point iteration cap (default 30)")
    s.add_argument("--energy-every", type=int, help="the map's energy at the end of a step every n steps "
                                                     "(one force evaluation each; default: --stride)")
    s.add_argument("--checkpoint-every", type=int, default=1000)
    s.add_argument("--out", required=True)
    s.add_argument("--resume", action="store_true", help="continue a stopped run from its last checkpoint")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("fit-action", help="fit a long-step map (learned action, or the direct baseline) to pairs "
                                          "of states dt apart, for a conservative model")
    s.add_argument("store", help="trajectory store with frames every dt (or a divisor); with --distill-ps: "
                                 "STORE[:FRAME] to start the distillation run from")
    s.add_argument("--model", required=True, help="the conservative model JSON the map belongs to")
    s.add_argument("--dt-fs", type=float, required=True, help="the long step h, fs")
    s.add_argument("--out", required=True, help="action model JSON to write")
    s.add_argument("--kind", choices=["action", "direct"], default="action")
    s.add_argument("--distill-ps", type=float, help="first run velocity Verlet (0.5 fs) with the model this long "
                                                    "and fit on that")
    s.add_argument("--distill-out", help="store of the distillation run (default OUT.distill.zarr)")
    s.add_argument("--distill-stride-fs", type=float, help="frame interval of the distillation run (default dt)")
    s.add_argument("--cutoff", type=float, help="cutoff of the pair features, Å (default 2.6)")
    s.add_argument("--pair-stride", type=int, default=1, help="use every n-th pair")
    s.add_argument("--chunk-pairs", type=int, default=50, help="pairs per dask task")
    s.add_argument("--ridge", type=float, help="ridge (default: chosen on the validation split)")
    s.add_argument("--scheduler", help="address of an existing dask scheduler (default: a LocalCluster)")
    s.add_argument("--workers", type=int, help="LocalCluster workers (default: one per core)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_fit_action)

    s = sub.add_parser("compare-dynamics", help="a run against a fine-step reference run: energy drift, "
                                                "equipartition, bonds, angles, g(r), VDOS up to the Nyquist frequency")
    s.add_argument("run", help="trajectory store of the run (e.g. the action integrator at 4 fs)")
    s.add_argument("--reference", required=True, help="trajectory store of the reference (e.g. Verlet at 0.5 fs)")
    s.add_argument("--blocks", type=int, default=8, help="time blocks for the standard errors")
    s.add_argument("--skip-ps", type=float, default=0.0, help="leave out the first ps of both runs")
    s.add_argument("--json", help="also write the comparison as JSON here")
    s.set_defaults(func=cmd_compare_dynamics)

    s = sub.add_parser("analyze", help="statistics of a trajectory store (temperatures, per-frame topology and "
                                       "ions, bonds, angles, proton transfers, g(r), spectra) -> STATS.zarr")
    s.add_argument("store", help="trajectory store, optionally STORE:START:STOP[:STRIDE]")
    s.add_argument("--out", required=True, help="statistics store to write (zarr)")
    s.add_argument("--frames", help="START:STOP[:STRIDE] frame indices to analyse (default all)")
    s.add_argument("--window-fs", type=float, default=100.0,
                   help="spectrum window length, fs (default 100: resolution 333 cm^-1)")
    s.add_argument("--pad", type=int, default=4, help="zero padding of each spectrum window (grid only; default 4)")
    s.add_argument("--bond-max", type=float, default=1.5,
                   help="an H farther than this from every O is free, Å (default 1.5)")
    s.add_argument("--rdf-max", type=float, default=6.0, help="g(r) range, Å (at most half the box)")
    s.add_argument("--rdf-bin", type=float, default=0.02, help="g(r) bin width, Å")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_analyze)

    s = sub.add_parser("report", help="compare model runs with a reference: scorecard (JSON, Markdown) + figures")
    s.add_argument("reference", help="reference trajectory or statistics store, optionally STORE:START:STOP")
    s.add_argument("models", nargs="+", help="model trajectory or statistics stores, each optionally STORE:START:STOP")
    s.add_argument("--out", required=True, help="report directory")
    s.add_argument("--blocks", type=int, default=8, help="time blocks for the standard errors (default 8)")
    s.add_argument("--window-fs", type=float, default=100.0, help="spectrum window for trajectory inputs, fs")
    s.add_argument("--pad", type=int, default=4, help="zero padding of spectrum windows for trajectory inputs")
    s.add_argument("--label", action="append", default=None,
                   help="name of a model in the scorecard and legends, once per model store in order "
                        "(default: the store names)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("run", help="run an ensemble of learned simulations on a dask cluster and aggregate them")
    s.add_argument("config", help="ensemble TOML (see configs/ensemble/)")
    s.add_argument("--out", required=True, help="output directory (members, aggregate, summary, figures)")
    _cluster_args(s, "the config's [cluster] table")
    s.add_argument("--retry-failed", action="store_true", help="rerun members whose dynamics failed before")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("demo", help="the whole pipeline on the embedded CP2K data: ingest, fit the many-body model "
                                    "and the paper's agent model, run an ensemble, aggregate, report against the "
                                    "reference")
    s.add_argument("--out", default="ensemble-demo", help="output directory (default ./ensemble-demo)")
    s.add_argument("--fit-stride", type=int, default=4, help="fit on every n-th frame (default 4)")
    s.add_argument("--steps", type=int, help="MD steps of every member (default: as in the demo ensemble)")
    _cluster_args(s, None)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("bench", help="benchmarks that print figures")
    bsub = s.add_subparsers(dest="what", required=True)
    b = bsub.add_parser("ingest", help="CP2K xyz ingestion throughput (MB/s, one core)")
    b.add_argument("--size-mb", type=float, default=200.0, help="size of the synthetic pos file, MB")
    b.add_argument("--workdir", help="scratch directory (default: a temporary one)")
    b.set_defaults(func=cmd_bench)
    b = bsub.add_parser("gram", help="Gram reduction: frames/s with 1 and 2 workers, memory, syrk fraction")
    b.add_argument("--frames", type=int, help="frames of the embedded data to use (default all)")
    b.add_argument("--long-factor", type=int, default=10, help="length of the long store, in default stores")
    b.add_argument("--scale", type=int, help="out of core at scale instead: build (once, cached in --workdir, default "
                   "~/.cache/ensemble) a learned-MD store SCALE x the embedded one and fit 1x, 10x, ... SCALE x of it "
                   "on 2 workers of --memory-limit each: peak RSS per worker, frames/s, spill, wall time")
    b.add_argument("--memory-limit", default="1GB", help="memory limit per worker with --scale (default 1GB)")
    b.add_argument("--weights", type=int, choices=[7, 18], default=18,
                   help="with --scale: the paper's 18 weight functions (703 columns) or 7 of them (119)")
    b.add_argument("--model", help="with --scale: the conservative cutoff model that makes the store "
                   "(default: one fitted on the embedded data)")
    b.add_argument("--workdir", help="scratch directory (default: a temporary one)")
    b.set_defaults(func=cmd_bench)
    b = bsub.add_parser("runner", help="ensemble runner: members/s and overhead per member, 1 and 2 workers")
    b.add_argument("--members", type=int, default=8)
    b.add_argument("--steps", type=int, default=1000, help="MD steps per member")
    b.add_argument("--model", help="a fitted cutoff-mode model JSON (default: random coefficients, cutoff 5 Å)")
    b.add_argument("--workdir", help="scratch directory (default: a temporary one)")
    b.set_defaults(func=cmd_bench)
    b = bsub.add_parser("md", help="MD steps/s and atom-steps/s, 128 and 1024 H2O, both modes; vs CP2K FIST")
    b.add_argument("--steps", type=int, default=100)
    b.add_argument("--model", help="a fitted model JSON (default: random coefficients, 7 weights)")
    b.add_argument("--cutoff", type=float, default=5.0, help="cutoff for the cutoff-mode runs, Å")
    b.add_argument("--action", nargs="+", metavar="A.json", help="action models (e.g. 2, 4 and 8 fs, fitted for "
                                                                  "--model; midpoint:H for the implicit midpoint rule "
                                                                  "at H fs; respa:H[:N] or respa-molecules:H[:N] for "
                                                                  "multiple time stepping, N inner steps): simulated "
                                                                  "ps per second "
                                                                  "against Verlet at 0.5 fs, and fixed-point "
                                                                  "iterations per step")
    b.add_argument("--action-ps", type=float, default=1.0, help="simulated ps per timed run of the action comparison")
    b.set_defaults(func=cmd_bench)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings on the command line: one line, no source excerpt."""
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        return int(args.func(args) or 0)
    except DynamicsError as exc:
        print(f"error: {exc} (frames written before it are kept)", file=sys.stderr)
        return exc.exit_code
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted. {exc}", file=sys.stderr)
        return 130
    except BrokenPipeError:            # output piped into e.g. `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
