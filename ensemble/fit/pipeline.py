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

from ..angular import AngularBasis, default_angular_basis
from ..configfile import read_toml
from ..errors import UserError
from ..features import QUADRATIC, FeatureSpec
from .gram import (SPLITS, GramSet, Splits, accumulate_gram, backward_elimination, configuration_splits, fit_joint,
                   fit_species, frame_splits, shortest_training_distances)
from ..invariants import WeightSet, check_cutoff, orthorhombic_box, paper_weights
from ..io.store import open_trajectory
from ..model import Model
from ..prior import DEFAULT_MARGIN_ANGSTROM, ShortRangePrior

__all__ = ["FitConfig", "load_fit_config", "fit_store", "fit_stores", "FitReport", "format_table", "store_split",
           "manybody_weights", "MANYBODY_CUTOFF_ANGSTROM", "FitError", "open_fit_stores"]


class FitError(UserError, ValueError):
    """Stores or settings a fit cannot use: the message names the store, the variable or setting,
    the frame where it applies, what was expected and what was found."""

KEEP_WORDS = ("all", "best")


def manybody_weights() -> WeightSet:
    """The pair weight functions of the many-body default: 7 of the paper's 18 (exp alpha = 1/2, 1/4;
    Gaussian sigma = 2, 4, 6 Å; power n = 1, 2). The angular basis's radial functions carry the
    short-range resolution; all 18 cost 666 quadratic columns per species for no measured gain."""
    return paper_weights().subset([1, 3, 9, 11, 13, 16, 17])


#: the pair cutoff of the many-body default: at most half the smallest training box (9.85 Å for 32 H2O)
MANYBODY_CUTOFF_ANGSTROM = 4.9


@dataclass(frozen=True)
class FitConfig:
    """What to fit (see ``configs/fit.toml`` and ``configs/fit-manybody.toml``).

    ``keep``: groups kept by backward elimination (an int: that many; ``"best"``: the step with the
    lowest validation error; ``"all"``: no elimination). Groups are the pair weight functions and
    the angular radial functions. ``quadratic``: which feature pairs get quadratic coefficients
    (:data:`ensemble.features.QUADRATIC`). ``prior``: a short-range repulsion below the shortest
    training distances minus ``prior_margin_angstrom`` (:mod:`ensemble.prior`). ``split_seed``:
    the shuffle of configuration sets (time series keep the time-ordered split)."""

    kind: str = "agent"
    weights: WeightSet = field(default_factory=paper_weights)
    cutoff_angstrom: float | None = None        # None: paper mode
    width_angstrom: float = 1.0
    splits: Splits = field(default_factory=Splits)
    ridge: float = 1e-10
    keep: int | str = 7
    chunk_frames: int = 50
    frame_stride: int = 1
    angular: AngularBasis | None = None
    quadratic: str = "pair"
    prior: bool = True
    prior_margin_angstrom: float = DEFAULT_MARGIN_ANGSTROM
    split_seed: int = 0
    ridge_scan: tuple[float, ...] = ()          # extra ridges solved on the same Gram and selection

    def __post_init__(self):
        if self.kind not in ("agent", "conservative"):
            raise ValueError(f"kind must be 'agent' or 'conservative', got {self.kind!r}")
        n_groups = len(self.weights) + (self.angular.n_radial if self.angular is not None else 0)
        if isinstance(self.keep, str):
            if self.keep not in KEEP_WORDS:
                raise ValueError(f"keep must be an integer or one of {KEEP_WORDS}, got {self.keep!r}")
        elif not 1 <= self.keep <= n_groups:
            raise ValueError(f"keep must be between 1 and {n_groups} (weight functions"
                             f"{' + angular radial functions' if self.angular is not None else ''}), got {self.keep}")
        if self.chunk_frames < 1 or self.frame_stride < 1:
            raise ValueError("chunk_frames and frame_stride must be >= 1")
        if not (np.isfinite(self.ridge) and self.ridge >= 0):
            raise ValueError(f"ridge must be a finite number >= 0, got {self.ridge}")
        if any(not (np.isfinite(r) and r >= 0) for r in self.ridge_scan):
            raise ValueError(f"ridge_scan must hold finite numbers >= 0, got {list(self.ridge_scan)}")
        if self.quadratic not in QUADRATIC:
            raise ValueError(f"quadratic must be one of {QUADRATIC}, got {self.quadratic!r}")
        if self.prior_margin_angstrom < 0:
            raise ValueError(f"prior_margin_angstrom must be >= 0, got {self.prior_margin_angstrom}")


def _angular_from(value, path) -> AngularBasis | None:
    if value is None or value is False or value == "none":
        return None
    if value is True or value == "default":
        return default_angular_basis()
    if isinstance(value, AngularBasis):
        return value
    if isinstance(value, dict):
        d = dict(value)
        d.setdefault("cutoff_angstrom", default_angular_basis().cutoff_angstrom)
        unknown = set(d) - {"mu_angstrom", "sigma_angstrom", "cutoff_angstrom", "cutoff_width_angstrom", "l_max",
                            "couplings"}
        if unknown:
            raise ValueError(f"{path}: unknown keys in [angular]: {sorted(unknown)}")
        if "mu_angstrom" not in d:
            base = default_angular_basis(float(d["cutoff_angstrom"]))
            d.setdefault("sigma_angstrom", base.sigma_angstrom)
            d["mu_angstrom"] = base.mu_angstrom
            d.setdefault("l_max", base.l_max)
            d.setdefault("couplings", base.couplings)
        return AngularBasis.from_json(d)
    raise ValueError(f"{path}: angular must be 'default', 'none' or an [angular] table, got {value!r}")


def load_fit_config(path: str | Path | None, **overrides) -> FitConfig:
    """Read ``[fit]``, ``[angular]`` and ``[splits]`` of a TOML file (None: defaults); keyword overrides win.

    ``angular`` may be ``"default"`` (:func:`ensemble.angular.default_angular_basis`), ``"none"`` or an
    ``[angular]`` table (mu_angstrom, sigma_angstrom, cutoff_angstrom, cutoff_width_angstrom, l_max,
    couplings; missing radial functions default to the default basis). With angular invariants the
    settings not given default to the many-body ones: :func:`manybody_weights`, cutoff mode at
    :data:`MANYBODY_CUTOFF_ANGSTROM` and ``keep = "best"``.
    """
    raw: dict = {}
    if path is not None:
        path = Path(path)
        raw = read_toml(path, "fit config", ValueError)
    fit = dict(raw.get("fit", {}))
    known = {"kind", "weights", "neighbour_mode", "cutoff_angstrom", "cutoff_width_angstrom", "ridge", "keep",
             "chunk_frames", "frame_stride", "angular", "quadratic", "prior", "prior_margin_angstrom", "split_seed",
             "ridge_scan"}
    unknown = set(fit) - known
    if unknown:
        raise ValueError(f"{path}: unknown keys in [fit]: {sorted(unknown)}; known: {sorted(known)}")
    if "angular" in raw and fit.get("angular", "default") in ("default", True):
        fit["angular"] = raw["angular"]          # the [angular] table refines angular = "default"
    fit.update({k: v for k, v in overrides.items() if v is not None})
    angular = _angular_from(fit.get("angular"), path)
    if angular is not None:
        fit.setdefault("weights", manybody_weights())
        fit.setdefault("neighbour_mode", "cutoff")
        fit.setdefault("cutoff_angstrom", MANYBODY_CUTOFF_ANGSTROM)
        fit.setdefault("keep", "best")
    weights = fit.get("weights", "paper")
    if weights == "paper":
        ws = paper_weights()
    elif isinstance(weights, WeightSet):
        ws = weights
    elif isinstance(weights, list):
        ws = WeightSet.from_json(weights)
    else:
        raise ValueError(f"{path}: [fit] weights must be 'paper' or a list of {{kind, param}} tables")
    mode = fit.get("neighbour_mode", "paper")
    if mode not in ("paper", "cutoff"):
        raise ValueError(f"{path}: neighbour_mode must be 'paper' or 'cutoff', got {mode!r}")
    keep = fit.get("keep", 7)
    sp = raw.get("splits", {})
    return FitConfig(kind=fit.get("kind", "agent"), weights=ws,
                     cutoff_angstrom=float(fit.get("cutoff_angstrom", 6.0)) if mode == "cutoff" else None,
                     width_angstrom=float(fit.get("cutoff_width_angstrom", 1.0)),
                     splits=Splits(**{k: float(v) for k, v in sp.items()}) if sp else Splits(),
                     ridge=float(fit.get("ridge", 1e-10)), keep=keep if isinstance(keep, str) else int(keep),
                     chunk_frames=int(fit.get("chunk_frames", 50)), frame_stride=int(fit.get("frame_stride", 1)),
                     angular=angular, quadratic=str(fit.get("quadratic", "pair")),
                     prior=bool(fit.get("prior", True)),
                     prior_margin_angstrom=float(fit.get("prior_margin_angstrom", DEFAULT_MARGIN_ANGSTROM)),
                     split_seed=int(fit.get("split_seed", 0)),
                     ridge_scan=_ridge_scan(fit.get("ridge_scan", ()), path))


def _ridge_scan(value, path) -> tuple[float, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, str):
        value = value.split(",") if value.strip() else []
    try:
        return tuple(sorted({float(v) for v in value}))
    except (TypeError, ValueError):
        raise ValueError(f"{path}: ridge_scan must be a list of numbers (e.g. [1e-10, 1e-6, 1e-4]), got {value!r}") \
            from None


@dataclass(frozen=True)
class FitReport:
    model: Model
    table: dict                 # order -> species -> split -> relative RMSE
    conditions: dict            # species (or "joint") -> condition number of the standardized Gram
    curves: dict                # species (or "joint") -> list of (n_kept, validation error, kept labels)
    chosen: dict                # species -> kept group labels
    gram_seconds: float
    frames: int
    columns: dict = field(default_factory=dict)     # column counts and Gram cost
    candidates: dict = field(default_factory=dict)  # ridge -> Model: cfg.ridge_scan solved on the same Gram / groups


def is_configuration_set(ds) -> bool:
    """A store of configurations (no time axis), as ingested from extxyz without velocities."""
    return bool(ds.attrs.get("configuration_set", False))


def store_split(ds, cfg: FitConfig, role: str = "fit", *, own_validation: bool = True,
                own_test: bool = True) -> np.ndarray:
    """Split of each frame of a store (-1 discarded, 0 train, 1 validation, 2 test).

    ``role`` "fit": time series are split along time (the paper's fractions, never shuffled),
    configuration sets by a seeded shuffle (:func:`ensemble.fit.gram.configuration_splits`);
    without ``own_validation`` / ``own_test`` (explicit validation / test stores were given)
    those frames train instead. ``role`` "validation" / "test": every frame in that split.
    """
    n = ds.sizes["frame"]
    if role == "validation":
        return np.ones(n, dtype=np.int64)
    if role == "test":
        return np.full(n, 2, dtype=np.int64)
    out = (configuration_splits(n, cfg.splits, cfg.split_seed) if is_configuration_set(ds)
           else frame_splits(n, cfg.splits))
    if not own_validation:
        out[out == 1] = 0
    if not own_test:
        out[out == 2] = 0
    return out


def _coefficients(coef: np.ndarray, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray]:
    """(A (F,), symmetric B (F, F)) of one species block's column vector."""
    f = spec.n_features
    a = np.asarray(coef[:f], dtype=float)
    b = np.zeros((f, f))
    j, l = spec.quadratic_pairs()
    b[j, l] = coef[f:f + len(j)]
    b[l, j] = coef[f:f + len(j)]
    return a, b


def _subset(spec: FeatureSpec, groups: list[int]) -> tuple[WeightSet, AngularBasis | None, np.ndarray]:
    """The weight set and angular basis of the kept groups, and the full-layout index of each of
    their features (in the subset layout's order)."""
    m = len(spec.weights)
    s_n = spec.n_species
    kw = sorted(g for g in groups if g < m)
    kr = sorted(g - m for g in groups if g >= m)
    ws = spec.weights.subset(kw)
    feat = [a * m + w for a in range(s_n) for w in kw]
    ang = None
    if spec.angular is not None and kr:
        ang = spec.angular.subset(kr)
        nr = spec.angular.n_radial
        nl = spec.angular.l_max + 1
        feat += [spec.p + a * nr + r for a in range(s_n) for r in kr]
        full = {tuple(int(v) for v in c): i for i, c in enumerate(spec.angular.channels(s_n))}
        for a, b, n, mm in ang.channels(s_n):
            c = full[(int(a), int(b), kr[n], kr[mm])]
            feat += [spec.p + s_n * nr + c * nl + l for l in range(nl)]
    return ws, ang, np.array(feat, dtype=np.int64)


def _model(cfg, gram, coefs, groups, masses, provenance, metrics, prior) -> Model:
    """A model over the kept groups from per-species full-layout coefficient blocks."""
    if not any(g < len(cfg.weights) for g in groups):
        groups = sorted(set(groups) | {0})      # a model needs >= 1 weight function (its coefficients stay 0)
    ws, ang, feat = _subset(gram.spec, groups)
    a_out, b_out = [], []
    for c in coefs:
        a_full, b_full = _coefficients(c, gram.spec)
        a_out.append(a_full[feat])
        b_out.append(b_full[np.ix_(feat, feat)])
    return Model(kind=gram.kind, species=gram.species, masses=masses, weights=ws, A=tuple(a_out), B=tuple(b_out),
                 cutoff_angstrom=cfg.cutoff_angstrom, width_angstrom=cfg.width_angstrom, metrics=metrics,
                 provenance=provenance, angular=ang, prior=prior)


def _choose(curve, keep) -> list[int]:
    if keep == "all":
        return curve[0][0]
    if keep == "best":
        return min(curve, key=lambda c: (c[1], -len(c[0])))[0]
    return next(k for k, _, _ in curve if len(k) == keep)


def _open(store, cfg: FitConfig):
    ds = open_trajectory(store)
    if cfg.frame_stride > 1:
        ds = ds.isel(frame=slice(None, None, cfg.frame_stride))
    return ds.chunk({"frame": cfg.chunk_frames})


def _target(ds, kind: str) -> str | None:
    """The variable a fit of ``kind`` reads its targets from (the other one, converted, if absent)."""
    order = ("forces", "accelerations") if kind == "conservative" else ("accelerations", "forces")
    return next((name for name in order if name in ds.variables), None)


def open_fit_stores(stores, cfg: FitConfig, *, validation=(), test=()) -> list[tuple[str, Path, object]]:
    """Open the stores of a fit as ``(role, path, dataset)`` and check, from their metadata alone,
    that the fit can use them: positions and forces or accelerations present, an orthorhombic box
    with positive edges, one mass per species (within a store and across stores), cutoffs within
    half of every box, at least one frame. Raises :class:`FitError` naming the store; nothing is
    computed."""
    stores = [Path(s) for s in stores]
    if not stores:
        raise FitError("fit needs at least one store")
    roles = [("fit", s) for s in stores] + [("validation", Path(s)) for s in validation] + \
        [("test", Path(s)) for s in test]
    opened = [(role, path, _open(path, cfg)) for role, path in roles]
    masses: dict = {}
    for role, path, ds in opened:
        if "positions" not in ds.variables:
            raise FitError(f"{path}: no variable 'positions'; a fit needs positions (frame, atom, xyz) in Å")
        if _target(ds, cfg.kind) is None:
            raise FitError(f"{path}: no variable 'forces' or 'accelerations'; a fit needs one of them as its target "
                           "(ingest a run with forces, or a store written by `ensemble simulate`)")
        if ds.sizes["frame"] < 1:
            raise FitError(f"{path}: no frames")
        try:
            boxes = orthorhombic_box(ds["cell"].values, f"{path}: cell")
        except ValueError as exc:
            raise FitError(str(exc)) from None
        if not np.isfinite(boxes).all():
            raise FitError(f"{path}: cell has non-finite edges; expected an orthorhombic box in Å")
        for name, (rc, w) in {"cutoff_angstrom": (cfg.cutoff_angstrom, cfg.width_angstrom),
                              "angular cutoff_angstrom": ((cfg.angular.cutoff_angstrom,
                                                           cfg.angular.cutoff_width_angstrom)
                                                          if cfg.angular is not None else (None, 1.0))}.items():
            try:
                check_cutoff(rc, w, boxes)
            except ValueError as exc:
                raise FitError(f"{path}: {name}: {exc}; choose a cutoff of at most half the smallest box edge "
                               "(--cutoff, or the config's cutoff_angstrom)") from None
        spec = np.array([str(x) for x in ds["species"].values])
        m_all = np.asarray(ds["masses"].values, float)
        if not (np.isfinite(m_all).all() and (m_all > 0).all()):
            raise FitError(f"{path}: masses must be finite and > 0 amu; got {m_all[~(np.isfinite(m_all) & (m_all > 0))][:3]}")
        for sp_ in sorted(set(spec)):
            m = np.unique(m_all[spec == sp_])
            if m.size > 1:
                raise FitError(f"{path}: atoms of species {sp_} have different masses {m.tolist()} amu; one loss per "
                               "species needs one mass (give isotopes their own species label)")
            if abs(masses.setdefault(sp_, m[0]) - m[0]) > 1e-3 * m[0]:
                raise FitError(f"{path}: species {sp_} has mass {m[0]} amu, another store {masses[sp_]} amu; "
                               "one loss per species needs one mass (the first store's is used within 0.1 %)")
    return opened


def _check_finite(opened, splits, cfg: FitConfig) -> None:
    """One lazy dask pass (per chunk, on the active scheduler) over the positions and the target of
    every frame the fit uses; raises :class:`FitError` naming the store, variable and frame of the
    first non-finite value. Reading the chunks also surfaces damaged stores here, before the Gram."""
    import dask
    import dask.array as da

    flags, where = [], []
    for (role, path, ds), split in zip(opened, splits):
        for name in ("positions", _target(ds, cfg.kind)):
            x = ds[name].data
            if not isinstance(x, da.Array):
                x = da.from_array(np.asarray(x), chunks=(cfg.chunk_frames,) + x.shape[1:])
            flags.append(da.isfinite(x).all(axis=tuple(range(1, x.ndim))))
            where.append((path, name, split))
    for ok, (path, name, split) in zip(dask.compute(*flags), where):
        bad = np.flatnonzero(~np.asarray(ok) & (split >= 0)) * cfg.frame_stride
        if bad.size:
            more = f" and {bad.size - 1} more frame(s) ({', '.join(map(str, bad[1:6]))}{', ...' if bad.size > 6 else ''})"
            raise FitError(f"{path}: variable {name!r} has non-finite values (NaN or inf) in frame {bad[0]}"
                           f"{more if bad.size > 1 else ''}; a fit cannot use them: repair the store, or fit on frames "
                           "without them")


def _check_counts(opened, splits, cfg: FitConfig, spec: FeatureSpec, order: list[str]) -> None:
    """Every split has frames, and the training rows are at least the Gram columns (else the least
    squares are underdetermined and the errors NaN). Raises :class:`FitError` with the counts."""
    per = np.zeros(3, dtype=np.int64)
    rows = np.zeros(len(order), dtype=np.int64)
    for (_, path, ds), split in zip(opened, splits):
        per += np.array([np.sum(split == k) for k in range(3)])
        spc = [str(x) for x in ds["species"].values]
        for s, name in enumerate(order):
            rows[s] += 3 * spc.count(name) * int(np.sum(split == 0))
    names = ", ".join(f"{store}: {int(ds.sizes['frame'])}" for _, store, ds in opened)
    # a split asked for (a fraction > 0, or a --validation / --test store) must get frames; train always
    wanted = [True] + [getattr(cfg.splits, n) > 0 or any(role == n for role, _, _ in opened) for n in SPLITS[1:]]
    missing = [n for n, k, w in zip(SPLITS, per, wanted) if k == 0 and w]
    if missing:
        raise FitError(f"the fit needs at least one frame in each split it is asked for; the frames used "
                       f"({names}) give train {per[0]}, validation {per[1]}, test {per[2]} with splits "
                       f"{cfg.splits.__dict__}: no {' or '.join(missing)} frame; fit on a longer trajectory (or "
                       "give --validation / --test stores)")
    if cfg.kind == "conservative":
        need, have, what = spec.block * len(order), int(rows.sum()), "all species together"
    else:
        s = int(np.argmin(rows))
        need, have, what = spec.block, int(rows[s]), f"species {order[s]}"
    if have < need:
        raise FitError(f"too few training rows: {have} rows ({per[0]} training frames) for {what}, but the "
                       f"{cfg.kind} fit has {need} columns ({spec.n_features} features + {spec.n_quadratic} quadratic"
                       f"{' per species' if cfg.kind == 'conservative' else ''}); need at least {need} rows: fit on "
                       "more frames, or fewer columns (fewer weight functions, --quadratic none)")


def fit_store(store: str | Path, cfg: FitConfig, *, progress=print, frame_progress=None) -> FitReport:
    """Fit ``cfg.kind`` on one trajectory store (uses the active dask client, if any)."""
    return fit_stores([store], cfg, progress=progress, frame_progress=frame_progress)


def fit_stores(stores, cfg: FitConfig, *, validation=(), test=(), progress=print, frame_progress=None) -> FitReport:
    """Fit ``cfg.kind`` on several stores at once (time series and / or configuration sets; boxes
    and systems may differ): their Gram matrices add. Each store is split by :func:`store_split`;
    ``validation`` / ``test`` stores serve only that split (then the fit stores train on those
    frames instead). Uses the active dask client, if any.

    Before any solve the stores are checked (:func:`open_fit_stores`), the frames used must be
    finite (one lazy pass) and the training rows at least the columns: a :class:`FitError` names
    the store, variable and frame. ``frame_progress(done, total)`` follows the Gram reduction in
    frames.
    """
    stores = [Path(s) for s in stores]
    opened = open_fit_stores(stores, cfg, validation=validation, test=test)
    order = sorted({str(x) for _, _, ds in opened for x in ds["species"].values})
    masses: dict = {}
    for _, path, ds in opened:
        for sp_, m in zip((str(x) for x in ds["species"].values), np.asarray(ds["masses"].values, float)):
            masses.setdefault(sp_, m)
    splits = [store_split(ds, cfg, role, own_validation=not validation, own_test=not test) for role, _, ds in opened]
    spec = FeatureSpec(len(order), cfg.weights, cfg.angular, cfg.quadratic, cfg.cutoff_angstrom, cfg.width_angstrom)
    _check_finite(opened, splits, cfg)
    _check_counts(opened, splits, cfg, spec, order)
    t0 = time.perf_counter()
    prior = None
    shortest = np.full((len(order), len(order)), np.inf)
    for (role, _, ds), split in zip(opened, splits):
        if role == "fit" and np.any(split == 0):
            shortest = np.minimum(shortest, shortest_training_distances(ds, split, species_order=order))
    if cfg.prior:
        prior = ShortRangePrior(tuple(order), shortest, cfg.prior_margin_angstrom)
    gram: GramSet | None = None
    total = int(sum(ds.sizes["frame"] for _, _, ds in opened))
    done = [0]

    def chunk_done(n: int) -> None:
        done[0] += n
        frame_progress(done[0], total)

    for (role, path, ds), split in zip(opened, splits):
        part = accumulate_gram(ds, kind=cfg.kind, features=spec, split=split, species_order=order, prior=prior,
                               progress=chunk_done if frame_progress is not None else None)
        gram = part if gram is None else gram + part
    gram_s = time.perf_counter() - t0
    n_frames = int(sum(ds.sizes["frame"] for _, _, ds in opened))
    n_cols = gram.block * (len(order) if cfg.kind == "conservative" else 1)
    n_rows = int(gram.rows.sum())
    columns = {"features_per_species": spec.n_features, "pair_features": spec.p, "angular_features": spec.q,
               "quadratic_columns_per_species": spec.n_quadratic, "columns_per_block": gram.block,
               "gram_columns": n_cols, "rows": n_rows, "gram_seconds": gram_s,
               "gram_gflop": n_rows * (n_cols + 1) ** 2 / 1e9,
               "frames_per_s": n_frames / gram_s if gram_s > 0 else float("nan")}
    progress(f"Gram reduction: {n_frames} frames of {len(stores) + len(validation) + len(test)} store(s) in "
             f"{gram_s:.1f} s ({columns['frames_per_s']:.1f} frames/s); {spec.n_features} features "
             f"({spec.p} pair + {spec.q} angular) and {spec.n_quadratic} quadratic columns per species block, "
             f"{n_cols} Gram columns, {n_rows} rows")
    masses_t = tuple(float(masses[s]) for s in order)
    names = gram.spec.group_names()
    table: dict = {"linear": {}, "quadratic": {}}
    curves: dict = {}
    chosen: dict = {}
    conditions: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if cfg.kind == "agent":
            coefs, kept, keeps = [], set(), []
            for s, name in enumerate(gram.species):
                if gram.rows[s, 0] == 0:
                    raise FitError(f"species {name}: no training rows")
                curve = (backward_elimination(gram, s, cfg.ridge) if cfg.keep != "all"
                         else [(list(range(gram.n_groups)), None, None)])
                curves[name] = [(len(k), e, [names[i] for i in k]) for k, e, _ in curve]
                keep = _choose(curve, cfg.keep)
                keeps.append(keep)
                chosen[name] = [names[i] for i in keep]
                kept |= set(keep)
                fit = fit_species(gram, s, keep, cfg.ridge)
                coefs.append(fit.coef)
                conditions[name] = fit.condition
                table["quadratic"][name] = fit.errors
                table["linear"][name] = fit_species(gram, s, keep, cfg.ridge, quadratic=False).errors
                if cfg.keep == "all":
                    curves[name] = [(len(keep), fit.errors["validation"], chosen[name])]
            groups = sorted(kept)
        else:
            curve = (backward_elimination(gram, None, cfg.ridge) if cfg.keep != "all"
                     else [(list(range(gram.n_groups)), None, None)])
            keep = _choose(curve, cfg.keep)
            for name in gram.species:
                chosen[name] = [names[i] for i in keep]
            joint = fit_joint(gram, keep, cfg.ridge)
            curves["joint"] = [(len(k), e, [names[i] for i in k]) for k, e, _ in curve]
            if cfg.keep == "all":
                curves["joint"] = [(len(keep), float(np.nanmean([e["validation"] for e in joint.errors.values()])),
                                    chosen[gram.species[0]])]
            conditions["joint"] = joint.condition
            lin = fit_joint(gram, keep, cfg.ridge, quadratic=False)
            table["quadratic"] = joint.errors
            table["linear"] = lin.errors
            coefs = [joint.coef_of(s, gram.block) for s in range(len(order))]
            groups = keep
    metrics = {"relative_rmse": table, "condition_number": conditions, "selection_curve": curves,
               "chosen_groups": chosen, "splits": cfg.splits.__dict__, "ridge": cfg.ridge, "frames": n_frames,
               "frame_stride": cfg.frame_stride, "columns": columns, "quadratic": cfg.quadratic,
               "split_rule": {str(path): ("configuration set: seeded shuffle" if role == "fit" and
                                          is_configuration_set(ds) else "time-ordered" if role == "fit" else
                                          f"all {role}") for role, path, ds in opened},
               "split_seed": cfg.split_seed,
               "target": ("accelerations (Å/fs^2)" if cfg.kind == "agent" else "forces (eV/Å)")
               + (" minus the short-range prior's" if prior is not None else "")}
    boxes = np.concatenate([orthorhombic_box(ds["cell"].values).reshape(-1, 3) for _, _, ds in opened])
    prov = {"stores": [{"role": role, "path": str(path.resolve()), "title": ds.attrs.get("title", ""),
                        "frames": int(ds.sizes["frame"]),
                        "source_files": [{k: f.get(k) for k in ("role", "sha256")}
                                         for f in ds.attrs.get("source_files", [])]} for role, path, ds in opened],
            "store": str(stores[0].resolve()),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "training_box_angstrom": [float(b) for b in np.min(boxes, axis=0)]}
    model = _model(cfg, gram, coefs, groups, masses_t, prov, metrics, prior)
    candidates = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for ridge in cfg.ridge_scan:
            if ridge == cfg.ridge:
                candidates[ridge] = model
                continue
            if cfg.kind == "agent":
                fits = [fit_species(gram, s, keeps[s], ridge) for s in range(len(gram.species))]
                errs, cs, cond = ({n: f.errors for n, f in zip(gram.species, fits)}, [f.coef for f in fits],
                                  {n: f.condition for n, f in zip(gram.species, fits)})
            else:
                joint = fit_joint(gram, keep, ridge)
                errs, cs, cond = joint.errors, [joint.coef_of(s, gram.block) for s in range(len(order))], \
                    {"joint": joint.condition}
            m = {**metrics, "ridge": ridge, "relative_rmse": {**table, "quadratic": errs}, "condition_number": cond,
                 "selection_ridge": cfg.ridge}
            candidates[ridge] = _model(cfg, gram, cs, groups, masses_t, prov, m, prior)
    return FitReport(model=model, table=table, conditions=conditions, curves=curves, chosen=chosen,
                     gram_seconds=gram_s, frames=n_frames, columns=columns, candidates=candidates)


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
    lines.append("validation error with all groups (weight functions, angular radial functions): "
                 + ", ".join(f"{k} {v:.4f}" for k, v in full.items()))
    conds = ", ".join(f"{k} {v:.1e}" for k, v in report.conditions.items())
    lines.append(f"condition number of the standardized Gram matrix (train): {conds}"
                 + ("  [poor: ridge-regularised]" if max(report.conditions.values()) > 1e12 else ""))
    c = report.columns
    if c:
        lines.append(f"columns: {c['features_per_species']} features per species ({c['pair_features']} pair + "
                     f"{c['angular_features']} angular) + {c['quadratic_columns_per_species']} quadratic; Gram "
                     f"{c['gram_columns']} columns x {c['rows']} rows ({c['gram_gflop']:.0f} GFLOP of Z^T Z) in "
                     f"{c['gram_seconds']:.1f} s")
    return "\n".join(lines)


def plot_selection(report: FitReport, path: str | Path) -> Path:
    """Validation relative RMSE vs number of kept groups (paper Fig. 2: weight functions), as PNG."""
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
        ax.set_xlabel("groups kept (weight functions + angular radial functions)")
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
