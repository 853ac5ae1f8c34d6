"""Did a run fail, when, and why: three named criteria, each with its time and cause.

1. ``blow_up``: non-finite positions or velocities, a runaway temperature (above
   ``runaway_temperature_K``), a lost thermostat (the mean temperature over ``thermostat_window_fs``
   above ``thermostat_factor`` times the run's thermostat target, when the run store names one),
   or a run that stopped (its store says ``failed: ...``).
2. ``dissociation``: a free hydrogen (farther than the bonding distance from every O), an O
   holding 4 or more H, or two O closer than ``oo_min_angstrom`` (collapse), sustained for
   ``sustain_fs`` (so one frame of a fast collision is not a failure).
3. ``structure``: after Fu et al. 2023 (TMLR, "Forces are not enough"): over sliding windows
   of ``window_fs`` (1 ps), the area 0-6 Å between the window's mean g(r) and the
   reference's, for O-O, O-H and H-H; the first window where the largest exceeds
   ``rdf_area_max`` (3.0 Å) fails. Needs a reference.

Proton transfer is chemistry, not failure: it is reported as a rate (:mod:`.topology`), and
never trips any of these. A run fails at the earliest time any criterion fires.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import xarray as xr

from .rdf import rdf_area
from .topology import BOND_MAX_ANGSTROM, AnalysisError

__all__ = ["Criterion", "StabilityConfig", "stability", "CRITERIA"]

CRITERIA = ("blow_up", "dissociation", "structure")


@dataclass(frozen=True)
class StabilityConfig:
    """Thresholds of the three criteria (defaults for liquid water)."""

    runaway_temperature_K: float = 2000.0
    thermostat_factor: float = 1.5
    thermostat_window_fs: float = 100.0
    oo_min_angstrom: float = 2.0
    sustain_fs: float = 20.0
    window_fs: float = 1000.0
    stride_fs: float = 250.0
    rdf_area_max: float = 3.0
    rdf_r_max_angstrom: float = 6.0

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not (np.isfinite(value) and value > 0):
                raise AnalysisError(f"stability setting {name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class Criterion:
    """Outcome of one criterion: ``time_fs`` since the run's first frame (None: did not fire)."""

    name: str
    failed: bool
    time_fs: float | None
    cause: str | None


def _first_sustained(flag: np.ndarray, frames: int) -> int | None:
    """First index where ``flag`` starts a run of at least ``frames`` True values (or runs to the end
    when the series is shorter than that), else None."""
    flag = np.asarray(flag, bool)
    if not flag.any():
        return None
    padded = np.concatenate([[False], flag, [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    for s, e in zip(edges[::2], edges[1::2]):
        if e - s >= frames or e == flag.size and flag.size < frames:
            return int(s)
    return None


def _blow_up(stats, t, cfg) -> Criterion:
    found = []
    finite = np.asarray(stats["finite"].values, bool) if "finite" in stats else np.ones(t.size, bool)
    if not finite.all():
        f = int(np.argmin(finite))
        found.append((t[f], "non-finite positions or velocities"))
    temp = np.asarray(stats["temperature"].values, float)
    hot = temp > cfg.runaway_temperature_K
    if hot.any():
        f = int(np.argmax(hot))
        found.append((t[f], f"temperature {temp[f]:.0f} K above {cfg.runaway_temperature_K:g} K (runaway)"))
    target = float(stats.attrs.get("thermostat_target_K", float("nan")) or float("nan"))
    if np.isfinite(target) and t.size > 1:
        dt = float(np.median(np.diff(t)))
        w = max(1, int(round(cfg.thermostat_window_fs / dt))) if dt > 0 else 1
        if temp.size >= w:
            run_mean = np.convolve(np.nan_to_num(temp, nan=np.inf), np.ones(w) / w, mode="valid")
            lost = run_mean > cfg.thermostat_factor * target
            if lost.any():
                f = int(np.argmax(lost))
                found.append((t[f], f"thermostat lost: mean temperature {run_mean[f]:.0f} K over "
                                    f"{cfg.thermostat_window_fs:g} fs from {t[f]:g} fs, above {cfg.thermostat_factor:g} "
                                    f"x the target {target:g} K"))
    status = str(stats.attrs.get("source_status", "complete"))
    if status.startswith("failed"):
        found.append((t[-1], f"run stopped: {status.removeprefix('failed: ')}"))
    if not found:
        return Criterion("blow_up", False, None, None)
    time, cause = min(found, key=lambda x: x[0])
    return Criterion("blow_up", True, float(time), cause)


def _dissociation(stats, t, cfg) -> Criterion:
    n = t.size
    dt = float(np.median(np.diff(t))) if n > 1 else cfg.sustain_fs
    frames = max(1, int(np.ceil(cfg.sustain_fs / dt - 1e-9)))
    finite = np.asarray(stats["finite"].values, bool) if "finite" in stats else np.ones(n, bool)
    bond_max = float(stats.attrs.get("bond_max_angstrom", BOND_MAX_ANGSTROM))
    checks = {
        "free": np.asarray(stats["n_free_hydrogen"].values) > 0,
        "crowded": np.asarray(stats["max_h_per_oxygen"].values) >= 4,
        "collapse": np.asarray(stats["oo_min"].values) < cfg.oo_min_angstrom,
    }
    found = []
    for kind, flag in checks.items():
        f = _first_sustained(flag & finite, frames)
        if f is None:
            continue
        if kind == "free":
            d = np.asarray(stats["oh_bond"].isel(frame=f).values)
            j = int(np.argmax(d))
            cause = (f"free hydrogen: H atom {int(stats['hydrogen'].values[j])} is {d[j]:.2f} Å from the nearest O "
                     f"(> {bond_max:g} Å) for >= {cfg.sustain_fs:g} fs")
        elif kind == "crowded":
            c = np.asarray(stats["o_hydrogens"].isel(frame=f).values)
            m = int(np.argmax(c))
            cause = f"O atom {int(stats['oxygen'].values[m])} holds {int(c[m])} H for >= {cfg.sustain_fs:g} fs"
        else:
            cause = (f"collapse: two O {float(stats['oo_min'].values[f]):.2f} Å apart (< {cfg.oo_min_angstrom:g} Å) "
                     f"for >= {cfg.sustain_fs:g} fs")
        found.append((t[f], cause))
    if not found:
        return Criterion("dissociation", False, None, None)
    time, cause = min(found, key=lambda x: x[0])
    return Criterion("dissociation", True, float(time), cause)


def structure_windows(stats: xr.Dataset, reference: xr.Dataset, cfg: StabilityConfig = StabilityConfig()):
    """(window start times fs, largest g(r) area per window, pair of that area) over sliding windows."""
    t = np.asarray(stats["time"].values, float)
    t = t - t[0]
    g_ref = reference["rdf"].mean("frame")
    dt = float(np.median(np.diff(t))) if t.size > 1 else 0.0
    span = float(t[-1]) + dt if t.size else 0.0           # each frame stands for dt of the run
    if span <= cfg.window_fs:
        starts = [0.0]
    else:
        starts = list(np.arange(0.0, span - cfg.window_fs + 1e-9, cfg.stride_fs))
    finite = np.asarray(stats["finite"].values, bool) if "finite" in stats else np.ones(t.size, bool)
    out = []
    for s in starts:
        inside = (t >= s) & (t < s + cfg.window_fs) | ((len(starts) == 1) & (t >= s))
        sel = np.flatnonzero(inside & finite)           # a blown-up frame is judged by blow-up, not here
        if sel.size == 0:
            continue
        area = rdf_area(stats["rdf"].isel(frame=sel).mean("frame"), g_ref, cfg.rdf_r_max_angstrom)
        vals = np.nan_to_num(np.asarray(area.values, float), nan=0.0)
        k = int(np.argmax(vals))
        out.append((float(s), float(vals[k]), str(area["pair"].values[k])))
    return out


def _structure(stats, reference, cfg) -> tuple[Criterion, list]:
    if reference is None:
        return Criterion("structure", False, None, "no reference given: not checked"), []
    windows = structure_windows(stats, reference, cfg)
    for start, area, pair in windows:
        if area > cfg.rdf_area_max:
            return Criterion("structure", True, start,
                             f"g(r) {pair} area {area:.2f} Å > {cfg.rdf_area_max:g} in the {cfg.window_fs:g} fs window "
                             f"from {start:g} fs"), windows
    return Criterion("structure", False, None, None), windows


def stability(stats: xr.Dataset, reference: xr.Dataset | None = None, cfg: StabilityConfig = StabilityConfig()) -> dict:
    """The three criteria for one run's statistics (and a reference's for ``structure``).

    Returns a JSON-ready dict: ``failed``, ``criterion`` / ``time_fs`` / ``cause`` of the earliest
    failure (None if none), ``duration_fs``, ``criteria`` (name -> failed, time_fs, cause) and
    ``rdf_area_max_per_window`` (start fs, largest area, pair).
    """
    t = np.asarray(stats["time"].values, float)
    if t.size == 0:
        raise AnalysisError("stability: the statistics hold no frames")
    t = t - t[0]
    structure, windows = _structure(stats, reference, cfg)
    crits = [_blow_up(stats, t, cfg), _dissociation(stats, t, cfg), structure]
    fired = [c for c in crits if c.failed]
    first = min(fired, key=lambda c: (c.time_fs, CRITERIA.index(c.name))) if fired else None
    return {"failed": first is not None, "criterion": first.name if first else None,
            "time_fs": first.time_fs if first else None, "cause": first.cause if first else None,
            "duration_fs": float(t[-1]), "criteria": {c.name: asdict(c) for c in crits},
            "rdf_area_max_per_window": [list(w) for w in windows], "settings": asdict(cfg)}
