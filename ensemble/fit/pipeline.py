"""The fit pipeline: trajectory store -> Gram reduction on a dask cluster -> selection -> model.

Configuration (``configs/fit.toml``) is read here and passed on as plain arguments;
:mod:`ensemble.fit` holds the numerics.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..configfile import read_toml
from .gram import SPLITS, Splits, accumulate_gram, backward_elimination, fit_joint, fit_species
from ..invariants import WeightSet, orthorhombic_box, paper_weights
from ..io.store import open_trajectory
from ..model import Model, coefficients_from_columns

__all__ = ["FitConfig", "load_fit_config", "fit_store", "FitReport", "format_table"]


@dataclass(frozen=True)
class FitConfig:
    """What to fit (see ``configs/fit.toml``)."""

    kind: str = "agent"
    weights: WeightSet = field(default_factory=paper_weights)
    cutoff_angstrom: float | None = None        # None: paper mode
    width_angstrom: float = 1.0
    splits: Splits = field(default_factory=Splits)
    ridge: float = 1e-10
    keep: int = 7                               # weight functions kept by backward elimination
    chunk_frames: int = 50
    frame_stride: int = 1

    def __post_init__(self):
        if self.kind not in ("agent", "conservative"):
            raise ValueError(f"kind must be 'agent' or 'conservative', got {self.kind!r}")
        if not 1 <= self.keep <= len(self.weights):
            raise ValueError(f"keep must be between 1 and {len(self.weights)}, got {self.keep}")
        if self.chunk_frames < 1 or self.frame_stride < 1:
            raise ValueError("chunk_frames and frame_stride must be >= 1")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")


def load_fit_config(path: str | Path | None, **overrides) -> FitConfig:
    """Read ``[fit]`` and ``[splits]`` of a TOML file (None: defaults); keyword overrides win."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        raw = read_toml(path, "fit config", ValueError)
    fit = dict(raw.get("fit", {}))
    known = {"kind", "weights", "neighbour_mode", "cutoff_angstrom", "cutoff_width_angstrom", "ridge", "keep",
             "chunk_frames", "frame_stride"}
    unknown = set(fit) - known
    if unknown:
        raise ValueError(f"{path}: unknown keys in [fit]: {sorted(unknown)}; known: {sorted(known)}")
    fit.update({k: v for k, v in overrides.items() if v is not None})
    weights = fit.get("weights", "paper")
    if weights == "paper":
        ws = paper_weights()
    elif isinstance(weights, list):
        ws = WeightSet.from_json(weights)
    else:
        raise ValueError(f"{path}: [fit] weights must be 'paper' or a list of {{kind, param}} tables")
    mode = fit.get("neighbour_mode", "paper")
    if mode not in ("paper", "cutoff"):
        raise ValueError(f"{path}: neighbour_mode must be 'paper' or 'cutoff', got {mode!r}")
    sp = raw.get("splits", {})
    return FitConfig(kind=fit.get("kind", "agent"), weights=ws,
                     cutoff_angstrom=float(fit.get("cutoff_angstrom", 6.0)) if mode == "cutoff" else None,
                     width_angstrom=float(fit.get("cutoff_width_angstrom", 1.0)),
                     splits=Splits(**{k: float(v) for k, v in sp.items()}) if sp else Splits(),
                     ridge=float(fit.get("ridge", 1e-10)), keep=int(fit.get("keep", 7)),
                     chunk_frames=int(fit.get("chunk_frames", 50)), frame_stride=int(fit.get("frame_stride", 1)))


@dataclass(frozen=True)
class FitReport:
    model: Model
    table: dict                 # order -> species -> split -> relative RMSE
    conditions: dict            # species (or "joint") -> condition number of the standardized Gram
    curves: dict                # species (or "joint") -> list of (n_kept, validation error, kept labels)
    chosen: dict                # species -> kept weight labels
    gram_seconds: float
    frames: int


def _model_from_agent(cfg, gram, fits, chosen_idx, masses, provenance, metrics) -> Model:
    """Agent model over the union of the species' chosen weight functions."""
    union = sorted(set().union(*chosen_idx.values()))
    ws = cfg.weights.subset(union)
    n_sp, m = len(gram.species), len(cfg.weights)
    p_full = n_sp * m
    feat = np.array([a * m + w for a in range(n_sp) for w in union])
    a_out, b_out = [], []
    for s, name in enumerate(gram.species):
        a_full, b_full = coefficients_from_columns(fits[name].coef, p_full)
        a_out.append(a_full[feat])
        b_out.append(b_full[np.ix_(feat, feat)])
    return Model(kind="agent", species=gram.species, masses=masses, weights=ws, A=tuple(a_out), B=tuple(b_out),
                 cutoff_angstrom=cfg.cutoff_angstrom, width_angstrom=cfg.width_angstrom, metrics=metrics,
                 provenance=provenance)


def _model_from_joint(cfg, gram, fit, keep, masses, provenance, metrics) -> Model:
    ws = cfg.weights.subset(keep)
    n_sp, m = len(gram.species), len(cfg.weights)
    feat = np.array([a * m + w for a in range(n_sp) for w in keep])
    a_out, b_out = [], []
    for s in range(n_sp):
        a_full, b_full = coefficients_from_columns(fit.coef_of(s, gram.block), n_sp * m)
        a_out.append(a_full[feat])
        b_out.append(b_full[np.ix_(feat, feat)])
    return Model(kind="conservative", species=gram.species, masses=masses, weights=ws, A=tuple(a_out),
                 B=tuple(b_out), cutoff_angstrom=cfg.cutoff_angstrom, width_angstrom=cfg.width_angstrom,
                 metrics=metrics, provenance=provenance)


def fit_store(store: str | Path, cfg: FitConfig, *, progress=print) -> FitReport:
    """Fit ``cfg.kind`` on a trajectory store (uses the active dask client, if any)."""
    ds = open_trajectory(store)
    if cfg.frame_stride > 1:
        ds = ds.isel(frame=slice(None, None, cfg.frame_stride))
    ds = ds.chunk({"frame": cfg.chunk_frames})
    t0 = time.perf_counter()
    gram = accumulate_gram(ds, cfg.weights, kind=cfg.kind, splits=cfg.splits, cutoff_angstrom=cfg.cutoff_angstrom,
                           width_angstrom=cfg.width_angstrom, quadratic=True)
    gram_s = time.perf_counter() - t0
    progress(f"Gram reduction: {ds.sizes['frame']} frames in {gram_s:.1f} s "
             f"({ds.sizes['frame'] / gram_s:.1f} frames/s); columns per species block {gram.block}")
    masses = tuple(float(ds["masses"].values[[str(x) for x in ds["species"].values].index(s)]) for s in gram.species)
    table: dict = {"linear": {}, "quadratic": {}}
    curves: dict = {}
    chosen: dict = {}
    conditions: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if cfg.kind == "agent":
            fits, chosen_idx = {}, {}
            for s, name in enumerate(gram.species):
                curve = backward_elimination(gram, s, cfg.ridge)
                curves[name] = [(len(k), e, [cfg.weights.labels[i] for i in k]) for k, e, _ in curve]
                keep = next(k for k, _, _ in curve if len(k) == cfg.keep)
                chosen_idx[name] = keep
                chosen[name] = [cfg.weights.labels[i] for i in keep]
                fits[name] = fit_species(gram, s, keep, cfg.ridge)
                conditions[name] = fits[name].condition
                table["quadratic"][name] = fits[name].errors
                table["linear"][name] = fit_species(gram, s, keep, cfg.ridge, quadratic=False).errors
        else:
            curve = backward_elimination(gram, None, cfg.ridge)
            curves["joint"] = [(len(k), e, [cfg.weights.labels[i] for i in k]) for k, e, _ in curve]
            keep = next(k for k, _, _ in curve if len(k) == cfg.keep)
            for name in gram.species:
                chosen[name] = [cfg.weights.labels[i] for i in keep]
            joint = fit_joint(gram, keep, cfg.ridge)
            conditions["joint"] = joint.condition
            lin = fit_joint(gram, keep, cfg.ridge, quadratic=False)
            table["quadratic"] = joint.errors
            table["linear"] = lin.errors
    metrics = {"relative_rmse": table, "condition_number": conditions, "selection_curve": curves, "chosen_weight_functions": chosen,
               "splits": cfg.splits.__dict__, "ridge": cfg.ridge, "frames": int(ds.sizes["frame"]),
               "frame_stride": cfg.frame_stride,
               "target": "accelerations (Å/fs^2)" if cfg.kind == "agent" else "forces (eV/Å)"}
    prov = {"store": str(Path(store).resolve()), "store_title": ds.attrs.get("title", ""),
            "store_source_files": [{k: f.get(k) for k in ("role", "sha256")} for f in ds.attrs.get("source_files", [])],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "training_box_angstrom": [float(b) for b in np.min(orthorhombic_box(ds["cell"].values).reshape(-1, 3), axis=0)]}
    if cfg.kind == "agent":
        model = _model_from_agent(cfg, gram, fits, chosen_idx, masses, prov, metrics)
    else:
        model = _model_from_joint(cfg, gram, joint, keep, masses, prov, metrics)
    return FitReport(model=model, table=table, conditions=conditions, curves=curves, chosen=chosen, gram_seconds=gram_s,
                     frames=int(ds.sizes["frame"]))


def format_table(report: FitReport, kind: str) -> str:
    """The paper's Table 1 for this data: relative RMSE, linear vs quadratic, per species and split."""
    species = list(report.table["quadratic"])
    lines = [f"Relative RMSE (paper eq. 5.2), {kind} model, {report.frames} frames "
             f"(paper Table 1, DFT water: linear 0.32 O / 0.38 H, quadratic 0.31 O / 0.33 H)",
             f"{'loss':<10} {'split':<11} " + " ".join(f"{s:>8}" for s in species)]
    for order in ("linear", "quadratic"):
        for split in SPLITS:
            vals = " ".join(f"{report.table[order][s][split]:8.4f}" for s in species)
            lines.append(f"{order:<10} {split:<11} {vals}")
    for s, labels in report.chosen.items():
        lines.append(f"kept for {s}: {', '.join(labels)}")
    full = {name: curve[0][1] for name, curve in report.curves.items()}
    lines.append("validation error with all weight functions: "
                 + ", ".join(f"{k} {v:.4f}" for k, v in full.items()))
    conds = ", ".join(f"{k} {v:.1e}" for k, v in report.conditions.items())
    lines.append(f"condition number of the standardized Gram matrix (train): {conds}"
                 + ("  [poor: ridge-regularised]" if max(report.conditions.values()) > 1e12 else ""))
    return "\n".join(lines)


def plot_selection(report: FitReport, path: str | Path) -> Path:
    """Validation relative RMSE vs number of kept weight functions (paper Fig. 2), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    kept = len(next(iter(report.chosen.values())))
    fig, axes = plt.subplots(1, len(report.curves), figsize=(4.5 * len(report.curves), 3.4), squeeze=False)
    for ax, (name, curve) in zip(axes[0], report.curves.items()):
        n = [c[0] for c in curve]
        e = [c[1] for c in curve]
        ax.plot(n, e, "o-", ms=3, label="backward elimination")
        ax.axvline(kept, color="0.5", ls="--", lw=0.8, label=f"kept: {kept}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
        ax.set_xlabel("weight functions kept")
        ax.set_ylabel("validation relative RMSE")
        ax.set_title({"joint": "all species (conservative)"}.get(name, name))
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
