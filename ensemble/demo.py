"""``ensemble demo``: the whole pipeline on the embedded CP2K data, as one function.

:func:`run_demo` unpacks the embedded trajectory (checking its kinetic energy against CP2K's),
fits the many-body model and the paper's agent model on it with dask, runs the demo ensemble
(``ensemble/data/demo-ensemble.toml``) as dask.distributed tasks, aggregates the members
(``summary.md``, ``figures/``, ``aggregate.zarr``) and reports one member of each model against
the reference (``report/``). It returns what it did as data (:class:`DemoResult`); progress
goes to a callback, and the command line (``ensemble.cli.cmd_demo``) prints.

The report compares like with like: for each model it takes a member in the reference's box
(tile 1) whose thermostat target is nearest the reference's own mean temperature (the grid
holds that temperature), lowest seed first.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEMO_CONFIG", "DEMO_FITS", "DemoFit", "DemoResult", "run_demo", "choose_compared", "member_label"]

#: the ensemble the demo runs (copied into its output directory, next to the models it fits)
DEMO_CONFIG = Path(__file__).parent / "data" / "demo-ensemble.toml"

#: the models the demo fits: file stem under ``OUT/models`` -> fit settings
DEMO_FITS = {"agent-paper": {"kind": "agent"},
             "manybody": {"kind": "conservative", "angular": "default"}}


@dataclass(frozen=True)
class DemoFit:
    """One model the demo fitted."""

    label: str                    # file stem: OUT/models/<label>.json
    kind: str                     # agent | conservative
    path: Path
    seconds: float
    frame_stride: int
    validation_relative_rmse: dict   # species -> validation relative RMSE (forces or accelerations)


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` did, with everything it wrote under ``out``."""

    out: Path
    reference: Path                   # the unpacked trajectory store
    reference_attrs: dict             # its attributes (provenance, kinetic-energy check)
    reference_temperature_K: float    # its mean temperature
    ensemble: object                  # ensemble.runner.Ensemble as run (steps overridden if asked)
    fits: tuple[DemoFit, ...]
    summaries: list[dict]             # one per member (ensemble.runner.run_ensemble)
    summary: dict                     # the aggregate's summary document (summary.json)
    compared: tuple                   # the members the report compares with the reference
    scorecards: dict                  # report label -> scorecard (ensemble.report.compare)
    report_labels: tuple[str, ...]    # labels of the compared members, in order
    seconds: float


def choose_compared(members, summaries: list[dict], temperature_K: float) -> list:
    """One member per model for the report: in the reference's box (tile 1), thermostat target
    nearest ``temperature_K`` (the reference's), lowest seed; only members that ran (complete
    or failed in their dynamics)."""
    chosen: dict = {}
    for m, s in zip(members, summaries):
        if m.tile != 1 or s["status"] not in ("complete", "failed"):
            continue
        best = chosen.get(m.model)
        if best is None or (abs(m.temperature_K - temperature_K), m.seed) < \
                (abs(best.temperature_K - temperature_K), best.seed):
            chosen[m.model] = m
    return list(chosen.values())


def member_label(member) -> str:
    """What a reader sees for a member in the report's legends and scorecard: model, thermostat
    target, box (tiling of the reference cell) and seed, never the hashed id."""
    return f"{member.model} {member.temperature_K:g} K x{member.tile} seed {member.seed}"


def run_demo(out: str | Path, *, fit_stride: int = 4, steps: int | None = None, cluster_spec=None,
             progress: Callable[[str], None] = print) -> DemoResult:
    """Run the whole pipeline on the embedded data into the directory ``out``.

    Parameters
    ----------
    out : output directory (created; the demo's own files in it are replaced)
    fit_stride : fit on every n-th frame of the embedded trajectory
    steps : MD steps of every member (default: as in the demo ensemble)
    cluster_spec : :class:`ensemble.cluster.ClusterSpec` to run on (default: a LocalCluster)
    progress : called with one message per stage (``[k/5] ...``)
    """
    from .cluster import open_client
    from .data import DEFAULT_DATA, write_default_store
    from .fit.pipeline import fit_store, load_fit_config
    from .io import format_summary, open_trajectory, summarize
    from .report import report_ensemble, write_report
    from .runner import load_ensemble, run_ensemble
    from .screen import format_screen_short, screen_fit, screened_by_default, with_ridge_scan

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ref = out / "reference.zarr"
    progress(f"[1/5] embedded default data: {DEFAULT_DATA.name} ({DEFAULT_DATA.stat().st_size / 1e6:.2f} MB)")
    info = write_default_store(ref, overwrite=True)
    progress(f"ingested it into {ref} (kinetic energy vs CP2K .ener: max relative error "
             f"{info['kinetic_energy_check']['max_rel_error']:.1e})")
    ref_ds = open_trajectory(ref)
    ref_temperature_K = float(ref_ds["temperature"].mean())
    progress(format_summary(summarize(ref_ds), str(ref)))
    (out / "models").mkdir(exist_ok=True)
    config = out / "ensemble.toml"
    shutil.copyfile(DEMO_CONFIG, config)
    ens = load_ensemble(config)
    if steps:
        ens = dataclasses.replace(ens, members=tuple(dataclasses.replace(m, steps=steps) for m in ens.members))
    fits = []
    with open_client(spec=cluster_spec) as client:
        for label, overrides in DEMO_FITS.items():
            t0 = time.perf_counter()
            cfg = load_fit_config(None, frame_stride=fit_stride, chunk_frames=10, **overrides)
            if screened_by_default(cfg):          # as `ensemble fit` does: the ridge that holds the liquid
                cfg = with_ridge_scan(cfg)
            rep = fit_store(ref, cfg, progress=lambda m: None)
            if rep.candidates:
                rep = screen_fit(rep, [ref], cfg, progress=lambda m: None)
                progress(f"[2/5] {label}: {format_screen_short(rep.model)}")
            path = out / "models" / f"{label}.json"
            rep.model.save(path)
            val = {s: round(v["validation"], 3) for s, v in rep.model.metrics["relative_rmse"]["quadratic"].items()}
            fits.append(DemoFit(label, cfg.kind, path, time.perf_counter() - t0, fit_stride, val))
            progress(f"[2/5] fitted {label} (every {fit_stride}th frame) in {fits[-1].seconds:.0f} s: validation "
                     f"relative RMSE of the {'forces' if cfg.kind == 'conservative' else 'accelerations'} {val}")
        progress(f"[3/5] ensemble: {len(ens.members)} members ({config})")
        summaries = run_ensemble(ens, out, client)
    progress("[4/5] aggregating across members")
    doc = report_ensemble(ens, out, summaries)
    compared = choose_compared(ens.members, summaries, ref_temperature_K)
    stores = [out / "members" / f"{m.id}.stats.zarr" for m in compared]
    cards = write_report(out / "reference.stats.zarr", stores, out / "report", overwrite=True,
                         labels=[member_label(m) for m in compared])
    return DemoResult(out=out, reference=ref, reference_attrs=info, reference_temperature_K=ref_temperature_K,
                      ensemble=ens, fits=tuple(fits), summaries=summaries, summary=doc, compared=tuple(compared),
                      scorecards=cards, report_labels=tuple(cards), seconds=time.perf_counter() - t_start)
