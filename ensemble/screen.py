"""Stability screen of fitted models: the least-regularised candidate that holds a liquid.

A fit's validation error measures forces on frames like the training ones. Whether the learned
energy keeps a liquid together for a picosecond is another question, and on little data the two
part: on 100 fs of CP2K DFT water (32 H2O, 119 training frames for 698 columns) the many-body
model with the default ridge (1e-10 on standardized columns) has the lowest validation error and
runs away within 35 fs of NVT at 500 K (two O fall into a hole below the training distances),
while a ridge of 1e-4 costs 10 % in validation error and runs 5 ps at 500 +- 2 K.

:func:`screen_candidates` runs each candidate (models of one fit at increasing ridges, see
``FitConfig.ridge_scan``) in short NVT from the last training frame, at the training frames' own
temperature, in order of increasing ridge, and stops at the first that passes:

- no blow-up: the run completes (no non-finite values, no runaway, see
  :class:`ensemble.md.simulate.SimulationError`);
- no dissociation (:mod:`ensemble.analysis.stability`: a free H, an O with >= 4 H, O-O collapse,
  sustained 20 fs);
- thermostatted: every block of ``block_fs`` has its mean temperature within ``max_heating`` (a
  fraction) of the target: a model that pours energy into the thermostat fails here first.

This layer sits after md and analysis in the flow (it runs both); the fit itself never runs MD.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import DynamicsError, UserError

__all__ = ["ScreenSettings", "ScreenResult", "ScreenError", "screen_candidates", "screen_initial_state", "screen_fit",
           "screened_by_default", "with_ridge_scan", "format_screen_short",
           "DEFAULT_RIDGE_SCAN", "format_screen"]

#: ridges tried by default (on standardized columns; the fit's own default is the first)
DEFAULT_RIDGE_SCAN = (1e-10, 1e-8, 1e-6, 1e-5, 1e-4, 1e-3)


#: the screen's temperature for stores without temperatures (configuration sets), K
DEFAULT_TEMPERATURE_K = 300.0


class ScreenError(UserError, ValueError):
    """Screen settings that cannot work (no temperature to screen at, a bad duration)."""


@dataclass(frozen=True)
class ScreenSettings:
    """How candidates are screened: ``picoseconds`` of NVT (Nosé-Hoover chain, ``tau_fs``) at
    ``temperature_K`` (None: the training frames' mean temperature) with ``dt_fs``; frames every
    ``stride`` steps; every ``block_fs`` block's mean temperature within ``max_heating`` of the
    target. ``seed``: velocities are drawn from Maxwell-Boltzmann only when the store has none."""

    picoseconds: float = 1.0
    dt_fs: float = 0.5
    stride: int = 10
    temperature_K: float | None = None         # None: the training frames' mean (300 K without temperatures)
    tau_fs: float = 100.0
    block_fs: float | None = None              # None: 250 fs, or a quarter of a shorter run
    max_heating: float = 0.25
    seed: int = 1

    def __post_init__(self):
        for name in ("picoseconds", "dt_fs", "tau_fs", "block_fs", "max_heating"):
            v = getattr(self, name)
            if v is None and name == "block_fs":
                continue
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ScreenError(f"screen setting {name} must be a finite number > 0, got {v!r}")
        if self.temperature_K is not None and not (math.isfinite(self.temperature_K) and self.temperature_K > 0):
            raise ScreenError(f"screen temperature must be a finite number > 0 K, got {self.temperature_K!r}")
        if self.block_fs is not None and self.block_fs > 1000.0 * self.picoseconds:
            raise ScreenError(f"screen block_fs {self.block_fs} is longer than the run ({self.picoseconds} ps)")

    @property
    def block(self) -> float:
        """Temperature block, fs."""
        return self.block_fs if self.block_fs is not None else min(250.0, 250.0 * self.picoseconds)

    @property
    def steps(self) -> int:
        return max(int(round(1000.0 * self.picoseconds / self.dt_fs)), self.stride)


@dataclass(frozen=True)
class ScreenResult:
    """One candidate's screen: ``passed`` or the ``reason`` it failed, and what the run showed."""

    ridge: float
    passed: bool
    reason: str | None
    temperature_K: float                 # target
    block_temperatures_K: tuple[float, ...]
    validation: dict                     # species -> validation relative RMSE of the candidate
    seconds: float
    ions_per_water: float | None = None  # mean (H3O+ + OH-) per O over the run (information, not a criterion)

    def as_json(self) -> dict:
        return {"ridge": self.ridge, "passed": self.passed, "reason": self.reason,
                "temperature_K": self.temperature_K,
                "block_temperatures_K": [round(t, 1) for t in self.block_temperatures_K],
                "validation_relative_rmse": self.validation, "seconds": round(self.seconds, 1),
                "ions_per_water": self.ions_per_water}


def screened_by_default(cfg) -> bool:
    """The many-body model (a conservative fit with angular invariants) is screened by default."""
    return cfg.kind == "conservative" and cfg.angular is not None


def with_ridge_scan(cfg):
    """``cfg`` solving a ridge scan: its own ``ridge_scan``, else its ridge and the default ladder
    (:data:`DEFAULT_RIDGE_SCAN`) above it; the selection runs at the smallest."""
    from dataclasses import replace

    scan = cfg.ridge_scan or tuple(sorted({cfg.ridge, *(r for r in DEFAULT_RIDGE_SCAN if r > cfg.ridge)}))
    return replace(cfg, ridge=min(scan), ridge_scan=scan)


def screen_initial_state(store, split: np.ndarray, settings: ScreenSettings):
    """The state a screen starts from: the last training frame of ``store`` (its velocities, or
    Maxwell-Boltzmann at the target when it has none), and the target temperature (the settings',
    or the mean temperature of the training frames). Returns ``(InitialState, temperature_K)``."""
    from .io.store import open_trajectory
    from .md import initial_state

    ds = open_trajectory(store)
    train = np.flatnonzero(np.asarray(split) == 0)
    if train.size == 0:
        raise ScreenError(f"{store}: no training frames to start a stability screen from")
    frame = int(train[-1])
    target = settings.temperature_K
    if target is None:
        target = (float(np.mean(np.asarray(ds["temperature"].isel(frame=train).values, float)))
                  if "temperature" in ds else DEFAULT_TEMPERATURE_K)
    has_v = "velocities" in ds
    init = initial_state(f"{store}:{frame}", temperature_K=None if has_v else target,
                         seed=None if has_v else settings.seed)
    return init, target


def _screen_one(ridge, model, init, target, settings: ScreenSettings, workdir: Path) -> ScreenResult:
    from .analysis import analyze, stability
    from .io.store import open_trajectory
    from .md import simulate

    t0 = time.perf_counter()
    val = {s: round(float(v["validation"]), 4) for s, v in
           model.metrics.get("relative_rmse", {}).get("quadratic", {}).items()}
    out = workdir / f"ridge-{ridge:g}.zarr"
    temps: tuple[float, ...] = ()
    reason = None
    ions = None
    try:
        simulate(model, init, steps=settings.steps, dt_fs=settings.dt_fs, temperature_K=target,
                 stride=settings.stride, tau_fs=settings.tau_fs, out=out, overwrite=True, write_forces=False,
                 checkpoint_every=settings.steps, max_temperature_K=max(5000.0, 4 * target))
    except DynamicsError as exc:
        reason = f"blow-up: {exc}"
    if out.exists():
        ds = open_trajectory(out)
        if "thermo_temperature" in ds and ds.sizes.get("md_step", 0):
            t = np.asarray(ds["thermo_temperature"].values, float)
            per = max(int(round(settings.block / settings.dt_fs)), 1)
            temps = tuple(float(t[i:i + per].mean()) for i in range(0, t.size - per + 1, per)) or (float(t.mean()),)
        if reason is None:
            stats = analyze(ds).compute()
            if "n_hydronium" in stats and stats.sizes.get("oxygen", 0):
                ions = float((stats["n_hydronium"] + stats["n_hydroxide"]).mean()) / stats.sizes["oxygen"]
            crit = stability(stats)
            if crit["failed"]:
                reason = f"{crit['criterion']} at {crit['time_fs']:.0f} fs: {crit['cause']}"
        if reason is None:
            off = [(i, tb) for i, tb in enumerate(temps) if abs(tb - target) > settings.max_heating * target]
            if off:
                i, tb = off[0]
                reason = (f"not thermostatted: mean temperature {tb:.0f} K in {i * settings.block:g}-"
                          f"{(i + 1) * settings.block:g} fs, target {target:.0f} K (more than "
                          f"{settings.max_heating:.0%} off)")
    return ScreenResult(ridge, reason is None, reason, target, temps, val, time.perf_counter() - t0, ions)


def screen_candidates(candidates: dict, init, temperature_K: float, settings: ScreenSettings = ScreenSettings(), *,
                      progress: Callable[[str], None] = print) -> tuple[float | None, list[ScreenResult]]:
    """Screen ``candidates`` (ridge -> Model) in order of increasing ridge from ``init`` at
    ``temperature_K``; stop at the first that passes. Returns ``(chosen ridge or None, results)``."""
    results = []
    with tempfile.TemporaryDirectory(prefix="ensemble-screen-") as tmp:
        for ridge in sorted(candidates):
            r = _screen_one(ridge, candidates[ridge], init, temperature_K, settings, Path(tmp))
            results.append(r)
            ions = f"; ions per water {r.ions_per_water:.3f}" if r.ions_per_water is not None else ""
            progress(f"screen ridge {ridge:g} (validation {r.validation}): "
                     + ("passed" if r.passed else f"failed ({r.reason})") + f"{ions} in {r.seconds:.0f} s")
            if r.passed:
                return ridge, results
    return None, results


def screen_fit(report, stores, cfg, settings: ScreenSettings = ScreenSettings(), *, own_validation: bool = True,
               own_test: bool = True, progress: Callable[[str], None] = print):
    """The fit ``report`` (of ``fit_stores(stores, cfg)`` with ``cfg.ridge_scan``) with its model
    replaced by the least-regularised candidate that passes the screen (the most regularised if
    none does), the table by that candidate's errors, and ``metrics["stability_screen"]`` saying
    what was run and found. The screen starts from the first store's last training frame."""
    from dataclasses import replace

    from .fit.pipeline import store_split
    from .io.store import open_trajectory

    if not report.candidates:
        raise ScreenError("the fit has no candidates to screen: give it a ridge_scan")
    store = Path(stores[0])
    ds = open_trajectory(store)
    # the fit split the strided frames; the screen starts from a frame of the store itself
    strided = store_split(ds.isel(frame=slice(None, None, cfg.frame_stride)), cfg, "fit",
                          own_validation=own_validation, own_test=own_test)
    split = np.full(ds.sizes["frame"], -1, dtype=np.int64)
    split[::cfg.frame_stride] = strided
    init, target = screen_initial_state(store, split, settings)
    chosen, results = screen_candidates(report.candidates, init, target, settings, progress=progress)
    progress(format_screen(chosen, results, settings))
    pick = chosen if chosen is not None else max(report.candidates)
    model = report.candidates[pick]
    doc = {"settings": {**settings.__dict__, "block_fs": settings.block, "steps": settings.steps}, "start": init.source,
           "chosen_ridge": pick, "passed": chosen is not None, "candidates": [r.as_json() for r in results]}
    model = replace(model, metrics={**model.metrics, "stability_screen": doc})
    table = {**report.table, "quadratic": model.metrics["relative_rmse"]["quadratic"]}
    return replace(report, model=model, table=table, conditions=model.metrics["condition_number"])


def format_screen_short(model) -> str:
    """One line on a screened model: the chosen ridge and what the screen saw for each candidate."""
    doc = model.metrics.get("stability_screen")
    if not doc:
        return "not screened"
    runs = ", ".join(f"{c['ridge']:g} {'passed' if c['passed'] else 'failed'}" for c in doc["candidates"])
    return (f"stability screen ({doc['settings']['picoseconds']:g} ps NVT at "
            f"{doc['candidates'][0]['temperature_K']:.0f} K per ridge: {runs}): "
            + (f"ridge {doc['chosen_ridge']:g}" if doc["passed"] else
               f"none passed, kept ridge {doc['chosen_ridge']:g}"))


def format_screen(chosen: float | None, results: list[ScreenResult], settings: ScreenSettings) -> str:
    """What the screen did, for the fit's printout."""
    head = (f"stability screen: {settings.picoseconds:g} ps NVT per candidate from the last training frame at "
            f"{results[0].temperature_K:.0f} K" if results else "stability screen: no candidates")
    if chosen is None:
        return head + "; no candidate passed: kept the most regularised one (ridge " \
            f"{max(r.ridge for r in results):g}); expect an unstable model: fit on more, or more varied, data"
    return head + f"; chose ridge {chosen:g}"
