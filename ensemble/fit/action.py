"""Fit a long-step map (:mod:`ensemble.md.action`) to pairs of states a lag apart.

``action``: S = h K + h V + h^3 sum_c a_c T_c at the midpoint x_bar = (x_t + x_t+h) / 2, so

    q_t+h - q_t - h v_bar            = h^3 sum_c a_c M^-1 dT_c/dv (x_bar)
    v_t+h - v_t - h M^-1 F(q_bar)    = -h^3 sum_c a_c M^-1 dT_c/dq (x_bar)

are linear in the a_c. ``direct`` (the baseline without structure): q_t+h - q_t - h v_t and
v_t+h - v_t linear in the same features at the start x_t, with independent coefficients.

Rows are mass-weighted so positions and velocities count alike: sqrt(m) x (position error, Å)
and h sqrt(m) x (velocity error, Å/fs), i.e. an error in sqrt(amu) Å, whose square is an
energy x time^2. Every pair enters twice, as recorded and time-reversed ((q_t+h, -v_t+h) ->
(q_t, -v_t)); for an action even in the velocities the reversed copy repeats the same equations.

One pass over the pairs accumulates, per species, component (q rows, v rows) and split, the
augmented Gram matrix [X y]^T [X y] (a dask map over chunks of pair starts, then a tree sum),
as :mod:`ensemble.fit.gram` does for the loss functions. Columns too rare in the data to be
determined (RMS below 1e-3 of the largest in their family) are dropped; the ridge is chosen on
the validation split; errors of dq and dv per species and split come from the Gram pieces.

Training pairs: a trajectory store (the reference), or a distillation run - velocity Verlet at
0.5 fs of the conservative model itself, as long as wanted (:func:`distill`).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr

from ..io.store import open_trajectory
from ..md.action import ActionModel, ActionModelError, ModelPotential, PairFeatures, default_features, file_sha256
from ..model import Model, load_model
from ..units import EV_PER_ANGSTROM_AMU_TO_ANGSTROM_PER_FS2 as EV_TO_INTERNAL
from .gram import SPLITS, Splits, frame_splits, solve_ridge

__all__ = ["ActionGram", "require_conservative", "check_action_inputs", "accumulate_action_gram", "pair_gram", "n_columns", "errors", "baseline_coef", "solve_action", "fit_action", "distill", "pair_rows",
           "RIDGES", "ActionFitReport", "format_action_table"]

RIDGES = (1e-10, 1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1)
COMPONENTS = ("q", "v")


def pair_rows(kind: str, h: float, masses: np.ndarray, q0, v0, q1, v1, force_fn, features, box):
    """Design rows and targets of one pair (x0 -> x1 a time h later), mass-weighted.

    Returns (Xq, yq, Xv, yv): (N*3, C) and (N*3,) for the position rows and the velocity rows,
    rows ordered (atom, xyz). ``force_fn(q) -> (eV/Å, eV)``; ``features.columns(q, v)``.
    """
    sq = np.sqrt(masses)[:, None]
    dq = q1 - q0
    if box is not None:
        dq -= box * np.rint(dq / box)                   # stores may wrap positions
    if kind == "action":
        qb, vb = q0 + 0.5 * dq, 0.5 * (v0 + v1)
        f, _ = force_fn(qb)
        _, dtq, dtv = features.columns(qb, vb)
        c = dtq.shape[0]
        xq = (h ** 3 * dtv / sq[None]).reshape(c, -1).T
        xv = (-h ** 4 * dtq / sq[None]).reshape(c, -1).T
        yq = (sq * (dq - h * vb)).ravel()
        yv = (h * sq * ((v1 - v0) - h * f * EV_TO_INTERNAL / masses[:, None])).ravel()
        return xq, yq, xv, yv
    f, _ = force_fn(q0)
    _, dtq, dtv = features.columns(q0, v0)
    c = dtq.shape[0]
    acc = f * EV_TO_INTERNAL / masses[:, None]
    n3 = q0.size
    xq = np.zeros((n3, 2 * (c + 1)))
    xv = np.zeros((n3, 2 * (c + 1)))
    xq[:, 0] = (sq * 0.5 * h * h * acc).ravel()
    xq[:, 1:c + 1] = (h ** 3 * dtv / sq[None]).reshape(c, -1).T
    xv[:, c + 1] = (h * sq * h * acc).ravel()
    xv[:, c + 2:] = (-h ** 4 * dtq / sq[None]).reshape(c, -1).T
    return xq, (sq * (dq - h * v0)).ravel(), xv, (h * sq * (v1 - v0)).ravel()


def n_columns(kind: str, n_features: int) -> int:
    return n_features if kind == "action" else 2 * (n_features + 1)


def pair_gram(kind, h, masses, codes, n_species, q0, v0, q1, v1, split, force_fn, features, box, reverse=True):
    """Augmented Gram matrices (S, 2 components, 3 splits, C + 1, C + 1) of pairs q0[t] -> q1[t]
    (split[t]: -1 unused, 0 train, 1 validation, 2 test); any ``force_fn`` and any features
    object with ``columns(q, v)`` and ``n_features``."""
    c = n_columns(kind, features.n_features)
    out = np.zeros((n_species, 2, 3, c + 1, c + 1))
    rows = [np.flatnonzero(np.repeat(codes == s, 3)) for s in range(n_species)]
    split = split.reshape(-1)
    for t in range(q0.shape[0]):
        sp = int(split[t])
        if sp < 0:
            continue
        pairs = [(q0[t], v0[t], q1[t], v1[t])]
        if reverse:
            pairs.append((q1[t], -v1[t], q0[t], -v0[t]))
        for a, b, cc, d in pairs:
            xq, yq, xv, yv = pair_rows(kind, h, masses, np.ascontiguousarray(a), np.ascontiguousarray(b),
                                       np.ascontiguousarray(cc), np.ascontiguousarray(d), force_fn, features, box)
            for comp, (x, y) in enumerate(((xq, yq), (xv, yv))):
                z = np.column_stack([x, y])
                for s in range(n_species):
                    zs = z[rows[s]]
                    out[s, comp, sp] += zs.T @ zs
    return out


def _gram_chunk(q0, v0, q1, v1, split, *, kind, h, masses, codes, n_species, model, features_spec, box, species,
                reverse):
    """Augmented Gram matrices of one chunk of pairs: (1, S, 2, 3, C + 1, C + 1)."""
    pot = ModelPotential(model, box, species)
    feats = features_spec.bind(species, masses, box)
    return pair_gram(kind, h, masses, codes, n_species, q0, v0, q1, v1, split, pot.forces, feats, box, reverse)[None]


@dataclass(frozen=True)
class ActionGram:
    """Reduced Gram matrices ``zz`` (species, component q/v, split, C + 1, C + 1), row counts
    (species, split) per component, and the layout."""

    zz: np.ndarray
    rows: np.ndarray
    kind: str
    dt_fs: float
    species: tuple[str, ...]
    masses: tuple[float, ...]
    features: PairFeatures
    pairs: int

    @property
    def n_columns(self) -> int:
        return self.zz.shape[-1] - 1

    def parts(self, split: int, species=None, components=(0, 1)):
        """(G, b, yy, n) summed over ``species`` (default all) and ``components``."""
        sp = range(len(self.species)) if species is None else species
        z = sum(self.zz[s, c, split] for s in sp for c in components)
        n = int(sum(self.rows[s, split] for s in sp)) * len(components)
        c = self.n_columns
        return z[:c, :c], z[:c, c], float(z[c, c]), n


def require_conservative(model: Model, name: str | Path) -> None:
    """The long-step map belongs to a conservative model; ``name`` (its file) heads the error."""
    if model.kind != "conservative":
        raise ActionModelError(f"{name}: kind {model.kind!r}; the long-step map needs a conservative model")


def check_action_inputs(ds: xr.Dataset, model: Model, *, dt_fs: float, kind: str = "action") -> int:
    """What a fit of a ``kind`` map of step ``dt_fs`` on ``ds`` for ``model`` needs, checked before any
    work (the command line calls it before it starts a cluster): a conservative model that knows the
    store's species, frames at a uniform interval that divides ``dt_fs``, >= 2 pairs. Returns the lag
    in frames."""
    if kind not in ("action", "direct"):
        raise ActionModelError(f"kind must be 'action' or 'direct', got {kind!r}")
    require_conservative(model, "the model")
    time_fs = np.asarray(ds["time"].values, float)
    if time_fs.size < 2:
        raise ActionModelError("the store needs at least 2 frames to make pairs")
    dt_frame = float(np.median(np.diff(time_fs)))
    lag = int(round(dt_fs / dt_frame))
    if lag < 1 or abs(lag * dt_frame - dt_fs) > 1e-6 * dt_fs or not np.allclose(np.diff(time_fs), dt_frame,
                                                                                 rtol=1e-6, atol=1e-9):
        raise ActionModelError(f"dt_fs {dt_fs:g} must be a whole number of the store's frame interval "
                               f"({dt_frame:g} fs, uniform); got {dt_fs / dt_frame:.4g} frames")
    n_pairs = ds.sizes["frame"] - lag
    if n_pairs < 2:
        raise ActionModelError(f"{ds.sizes['frame']} frames hold {max(n_pairs, 0)} pairs {lag} frames apart; need >= 2")
    species = {str(s) for s in ds["species"].values}
    if species - set(model.species):
        raise ActionModelError(f"the store has species {sorted(species)}; the model knows {model.species}")
    return lag


def accumulate_action_gram(ds: xr.Dataset, model: Model, *, dt_fs: float, kind: str = "action",
                           features: PairFeatures | None = None, splits: Splits = Splits(0.0, 0.8, 0.1, 0.1),
                           chunk_pairs: int = 50, reverse: bool = True, pair_stride: int = 1) -> ActionGram:
    """One pass over the pairs (frame t, frame t + lag) of a trajectory, lag = dt_fs / frame
    interval; dask-parallel over chunks of pair starts (the active scheduler)."""
    lag = check_action_inputs(ds, model, dt_fs=dt_fs, kind=kind)
    n_pairs = ds.sizes["frame"] - lag
    species = tuple(str(s) for s in ds["species"].values)
    features = features or default_features(model.species)
    codes = np.array([model.species.index(s) for s in species])
    masses = np.asarray(ds["masses"].values, float)
    from ..invariants import orthorhombic_box

    box = orthorhombic_box(ds["cell"].values, "cell")
    if box.ndim > 1:
        raise ActionModelError("the cell changes per frame; the action fit needs a fixed box")
    starts = np.arange(0, n_pairs, pair_stride)
    split = frame_splits(starts.size, splits)
    pos, vel = ds["positions"].data, ds["velocities"].data
    if not isinstance(pos, da.Array):
        pos, vel = da.from_array(np.asarray(pos)), da.from_array(np.asarray(vel))
    q0, v0 = pos[starts], vel[starts]
    q1, v1 = pos[starts + lag], vel[starts + lag]
    chunks = (tuple(np.diff(np.r_[np.arange(0, starts.size, chunk_pairs), starts.size])), -1, -1)
    q0, v0, q1, v1 = (a.rechunk(chunks) for a in (q0, v0, q1, v1))
    split_d = da.from_array(split, chunks=(chunks[0],))
    c = n_columns(kind, features.n_features)
    n_sp = len(model.species)
    parts = da.map_blocks(_gram_chunk, q0, v0, q1, v1, split_d[:, None, None],
                          kind=kind, h=float(dt_fs), masses=masses, codes=codes, n_species=n_sp, model=model,
                          features_spec=features, box=box, species=species, reverse=reverse,
                          dtype=float, chunks=((1,) * len(chunks[0]), (n_sp,), (2,), (3,), (c + 1,), (c + 1,)),
                          new_axis=[3, 4, 5], meta=np.empty((0,) * 6))
    zz = parts.sum(axis=0, split_every=4).compute()
    per = 3 * (2 if reverse else 1)
    rows = np.array([[per * int(np.sum(codes == s)) * int(np.sum(split == sp)) for sp in range(3)]
                     for s in range(n_sp)])
    return ActionGram(zz=zz, rows=rows, kind=kind, dt_fs=float(dt_fs), species=tuple(model.species),
                      masses=tuple(float(masses[codes == s][0]) if np.any(codes == s) else float("nan")
                                   for s in range(n_sp)),
                      features=features, pairs=int(starts.size))


def _families(gram: ActionGram) -> list[np.ndarray]:
    """Groups of columns of one kind (compared with each other when rare columns are dropped);
    a features object may declare its own (``column_families``, for the action kind)."""
    f = gram.features
    if gram.kind == "action" and hasattr(f, "column_families"):
        return [np.asarray(c) for c in f.column_families]
    if gram.kind == "action":
        return [np.arange(f.n_k), np.arange(f.n_k, f.n_features)]
    c = f.n_features
    return [np.array([0]), 1 + np.arange(f.n_k), 1 + np.arange(f.n_k, c), np.array([c + 1]),
            c + 2 + np.arange(f.n_k), c + 2 + np.arange(f.n_k, c)]


def live_columns(gram: ActionGram, rel: float = 1e-3) -> np.ndarray:
    """Columns whose training RMS is at least ``rel`` of the largest in their family."""
    g, _, _, n = gram.parts(0)
    rms = np.sqrt(np.maximum(np.diag(g), 0.0) / max(n, 1))
    live = np.zeros(gram.n_columns, bool)
    for fam in _families(gram):
        if fam.size and rms[fam].max() > 0:
            live[fam] = rms[fam] > rel * rms[fam].max()
    return live


def _sse(g, b, yy, c):
    return max(yy - 2.0 * c @ b + c @ g @ c, 0.0)


def solve_action(gram: ActionGram, ridge: float | None = None) -> tuple[np.ndarray, dict]:
    """Coefficients (full length, zeros for dropped columns) and metrics. ``ridge=None``: the
    value of :data:`RIDGES` with the lowest validation error (train error without a validation split)."""
    live = live_columns(gram)
    g, b, yy, n = gram.parts(0)
    gl, bl = g[np.ix_(live, live)], b[live]
    trials = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for lam in ([ridge] if ridge is not None else RIDGES):
            coef = np.zeros(gram.n_columns)
            cl, cond = solve_ridge(gl, bl, n, lam, name=f"{gram.kind} fit")
            coef[live] = cl
            val = 1 if gram.rows[:, 1].sum() else 0
            gv, bv, yyv, _ = gram.parts(val)
            trials.append((_sse(gv, bv, yyv, coef) / yyv if yyv > 0 else 0.0, lam, coef, cond))
    err, lam, coef, cond = min(trials, key=lambda t: t[0])
    return coef, {"ridge": lam, "condition_number": cond, "live_columns": int(live.sum()),
                  "columns": int(gram.n_columns), "ridge_scan": {f"{t[1]:g}": t[0] for t in trials}}


def baseline_coef(gram: ActionGram) -> np.ndarray:
    """The structure-free reference of each kind: a = 0 (implicit midpoint) for ``action``,
    q' = q + h v + h^2/2 a, v' = v + h a (an explicit Euler-Verlet guess) for ``direct``."""
    coef = np.zeros(gram.n_columns)
    if gram.kind == "direct":
        coef[0] = 1.0
        coef[gram.features.n_features + 1] = 1.0
    return coef


def errors(gram: ActionGram, coef: np.ndarray) -> dict:
    """Per species and split: RMS errors of dq (Å) and dv (Å/fs), and their relative size
    (error / RMS of the change itself is not in the Gram; relative to the target's RMS)."""
    h = gram.dt_fs
    out = {}
    for s, name in enumerate(gram.species):
        out[name] = {}
        for sp, split in enumerate(SPLITS):
            n = int(gram.rows[s, sp])
            if n == 0:
                continue
            row = {}
            for comp, cname in enumerate(COMPONENTS):
                g, b, yy, _ = gram.parts(sp, [s], [comp])
                sse = _sse(g, b, yy, coef)
                scale = np.sqrt(gram.masses[s]) * (h if cname == "v" else 1.0)
                row[f"rmse_d{cname}"] = float(np.sqrt(sse / n) / scale)
                row[f"relative_d{cname}"] = float(np.sqrt(sse / yy)) if yy > 0 else float("nan")
            out[name][split] = row
    return out


@dataclass(frozen=True)
class ActionFitReport:
    action: ActionModel
    gram_seconds: float
    pairs: int


def fit_action(store: str | Path | xr.Dataset, model_path: str | Path, *, dt_fs: float, kind: str = "action",
               features: PairFeatures | None = None, splits: Splits = Splits(0.0, 0.8, 0.1, 0.1),
               chunk_pairs: int = 50, pair_stride: int = 1, ridge: float | None = None,
               progress=print, provenance: dict | None = None) -> ActionFitReport:
    """Fit an action (or direct) map of step ``dt_fs`` on a store, for the conservative model at
    ``model_path`` (recorded with its sha256)."""
    model = load_model(model_path)
    require_conservative(model, model_path)
    ds = store if isinstance(store, xr.Dataset) else open_trajectory(store)
    t0 = time.perf_counter()
    gram = accumulate_action_gram(ds, model, dt_fs=dt_fs, kind=kind, features=features, splits=splits,
                                  chunk_pairs=chunk_pairs, pair_stride=pair_stride)
    secs = time.perf_counter() - t0
    progress(f"{kind} Gram reduction: {gram.pairs} pairs (x2, time-reversed) in {secs:.1f} s; "
             f"{gram.n_columns} columns")
    coef, solve = solve_action(gram, ridge)
    base = baseline_coef(gram)
    metrics = {"errors": errors(gram, coef), "baseline_errors": errors(gram, base),
               "baseline": "implicit midpoint rule (a = 0)" if kind == "action" else
               "q' = q + h v + h^2/2 a, v' = v + h a", "solve": solve, "pairs": gram.pairs,
               "splits": splits.__dict__, "rows": "sqrt(m) x position error and h sqrt(m) x velocity error"}
    prov = {"store": str(Path(store).resolve()) if not isinstance(store, xr.Dataset) else "<dataset>",
            "store_title": ds.attrs.get("title", ""), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "lag_frames": int(round(dt_fs / float(np.median(np.diff(ds["time"].values))))), **(provenance or {})}
    am = ActionModel(kind=kind, dt_fs=float(dt_fs), features=gram.features, coef=coef,
                     potential={"path": str(Path(model_path).resolve()), "sha256": file_sha256(model_path),
                                "kind": model.kind},
                     metrics=metrics, provenance=prov)
    return ActionFitReport(am, secs, gram.pairs)


def format_action_table(am: ActionModel) -> str:
    """Validation errors of dq and dv per species: fitted vs the structure-free baseline."""
    e, b = am.metrics["errors"], am.metrics["baseline_errors"]
    split = "validation" if any("validation" in v for v in e.values()) else "train"
    lines = [f"{am.kind} map, h = {am.dt_fs:g} fs, {split} split ({am.metrics['baseline']} as baseline)",
             "| species | RMSE dq (Å) | baseline | RMSE dv (Å/fs) | baseline | relative dq | relative dv |",
             "|---|---|---|---|---|---|---|"]
    for s in e:
        if split not in e[s]:
            continue
        r, r0 = e[s][split], b[s][split]
        lines.append(f"| {s} | {r['rmse_dq']:.2e} | {r0['rmse_dq']:.2e} | {r['rmse_dv']:.2e} | {r0['rmse_dv']:.2e} | "
                     f"{r['relative_dq']:.3f} | {r['relative_dv']:.3f} |")
    sv = am.metrics["solve"]
    lines.append(f"ridge {sv['ridge']:g} (chosen on validation), {sv['live_columns']} of {sv['columns']} columns "
                 "determined by the data")
    return "\n".join(lines)


def distill(model_path: str | Path, init: str, out: str | Path, *, ps: float, dt_fs: float = 0.5,
            stride_fs: float, overwrite: bool = False, progress=None) -> Path:
    """A velocity-Verlet NVE run of the conservative model (``dt_fs``, default 0.5 fs) from
    ``init`` (STORE[:FRAME]), frames every ``stride_fs``: training pairs without limit."""
    from ..md import initial_state, simulate

    stride = int(round(stride_fs / dt_fs))
    if stride < 1 or abs(stride * dt_fs - stride_fs) > 1e-9:
        raise ActionModelError(f"the frame interval {stride_fs:g} fs must be a whole number of Verlet steps of "
                               f"{dt_fs:g} fs")
    steps = int(round(ps * 1000.0 / dt_fs))
    steps -= steps % stride
    model = load_model(model_path)
    state = initial_state(init)
    simulate(model, state, steps=steps, dt_fs=dt_fs, stride=stride, out=out, overwrite=overwrite,
             write_forces=False, checkpoint_every=max(steps, 1000), progress=progress,
             run_attrs={"distillation_of": str(Path(model_path).resolve())})
    return Path(out)
