"""Errors of a fitted model on reference frames: how a model does on data it was not fitted to.

The fit reports its errors from Gram submatrices on its own validation and test frames. A user with
a second data set (more DFT frames, another box, a held-out set) wants the same numbers for a model
that already exists, computed from the model's predictions, not from the fit's algebra:

- :func:`evaluate_store` runs the model on every frame of a store, one dask task per frame chunk on
  whatever scheduler is active, and keeps a few sums per frame and species (a declared reduction:
  sums and maxima; memory O(frames x species), never the forces of a trajectory);
- :func:`summarize` turns them into the figures a force-field paper reports: relative RMSE (the
  paper's eq. 5.2, on the kind's own target), force RMSE / MAE / largest atom error in eV/Å, the
  reference's RMS force, and, for a conservative model on a store with energies, the energy RMSE
  per atom after one constant offset (a model fitted to forces knows its energy up to a constant);
- :func:`fit_split` gives a store's frames in one of the splits the model's fit used (its
  fractions, shuffle seed and frame stride, from the model's metrics), so ``--split test``
  evaluates exactly the frames the fit held out.

Units: positions Å, forces eV/Å (an agent model's "force" is mass x its acceleration, so its
relative RMSE is that of the accelerations it was fitted to), energies eV.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from .errors import UserError
from .invariants import orthorhombic_box, species_index
from .model import Model
from .units import EV_PER_ANGSTROM_AMU_TO_ANGSTROM_PER_FS2

__all__ = ["EvaluationError", "evaluate_store", "summarize", "fit_split", "SPLIT_NAMES"]

SPLIT_NAMES = ("train", "validation", "test")
#: per frame and species, in this order: squared error, squared reference, absolute error (sums over
#: the species' atoms and x, y, z) and the largest atom error |F_model - F_ref|
_PER_SPECIES = ("squared_error", "squared_reference", "absolute_error", "max_atom_error")
_UNITS = {"squared_error": "eV^2/Å^2", "squared_reference": "eV^2/Å^2", "absolute_error": "eV/Å",
          "max_atom_error": "eV/Å"}


class EvaluationError(UserError, ValueError):
    """A store cannot be evaluated with a model (species, masses, box, values, split)."""


# ---------------------------------------------------------------- kernel layer (one chunk of frames)
def _chunk_errors(pos, ref, box, model: Model, species, codes, with_energy: bool) -> np.ndarray:
    """Per frame of a chunk: (4 x S per-species sums, model energy, finite flag); see ``_PER_SPECIES``."""
    pos, ref, box = np.asarray(pos, float), np.asarray(ref, float), np.asarray(box, float)
    n_species = len(model.species)
    out = np.full((pos.shape[0], 4 * n_species + 2), np.nan)
    fn, fn_box = None, None
    for i in range(pos.shape[0]):
        if not (np.isfinite(pos[i]).all() and np.isfinite(ref[i]).all()):
            out[i, -1] = 0.0
            continue
        if fn is None or not np.array_equal(box[i], fn_box):
            fn, fn_box = model.force_fn(box[i], species), box[i].copy()
        forces, energy = fn(pos[i])
        diff = forces - ref[i]
        for s in range(n_species):
            d, r = diff[codes == s], ref[i][codes == s]
            out[i, s] = np.sum(d * d)
            out[i, n_species + s] = np.sum(r * r)
            out[i, 2 * n_species + s] = np.sum(np.abs(d))
            out[i, 3 * n_species + s] = np.sqrt(np.max(np.sum(d * d, axis=1))) if d.size else 0.0
        if with_energy:
            out[i, -2] = energy
        out[i, -1] = 1.0
    return out


# ---------------------------------------------------------------- wrappers
def _reference_forces(ds: xr.Dataset, path) -> tuple[str, object]:
    """The store's reference forces (eV/Å) as a dask array: its forces, else mass x accelerations."""
    if "forces" in ds.variables:
        return "forces", ds["forces"].data
    if "accelerations" in ds.variables:
        m = np.asarray(ds["masses"].values, float) / EV_PER_ANGSTROM_AMU_TO_ANGSTROM_PER_FS2
        return "accelerations", ds["accelerations"].data * m[None, :, None]
    raise EvaluationError(f"{path}: no variable 'forces' or 'accelerations' to compare the model with "
                          "(ingest a run or a configuration set with forces)")


def check_store(model: Model, ds: xr.Dataset, path) -> np.ndarray:
    """Check, from metadata alone, that ``model`` can be evaluated on the store: positions and forces
    (or accelerations) present, species the model knows, the model's masses (within 0.1 %), an
    orthorhombic box its cutoffs fit in. Returns the boxes (F, 3) or (3,), Å."""
    if "positions" not in ds.variables:
        raise EvaluationError(f"{path}: no variable 'positions'")
    _reference_forces(ds, path)
    if ds.sizes["frame"] < 1:
        raise EvaluationError(f"{path}: no frames")
    species = [str(s) for s in ds["species"].values]
    try:
        codes, _ = species_index(species, list(model.species))
    except ValueError as exc:
        raise EvaluationError(f"{path}: {exc}") from None
    masses = np.asarray(ds["masses"].values, float)
    want = np.asarray(model.masses, float)[codes]
    bad = np.flatnonzero(~(np.abs(masses - want) <= 1e-3 * want))
    if bad.size:
        k = bad[0]
        raise EvaluationError(f"{path}: atom {k} ({species[k]}) has mass {masses[k]} amu, the model's {species[k]} "
                              f"{want[k]} amu; the model's accelerations and the store's would not compare")
    try:
        boxes = orthorhombic_box(ds["cell"].values, f"{path}: cell")
        model._setup(species, boxes if boxes.ndim == 1 else boxes[int(np.argmin(boxes.min(axis=1)))])
    except ValueError as exc:
        raise EvaluationError(f"{path}: {exc}") from None
    return boxes


def evaluate_store(model: Model, ds: xr.Dataset, *, path: str | Path = "store", chunk_frames: int | None = None,
                   frames: np.ndarray | None = None) -> xr.Dataset:
    """The model's errors on every frame of ``ds`` (or the frame indices ``frames``): a Dataset with
    ``squared_error``, ``squared_reference``, ``absolute_error``, ``max_atom_error`` (frame, species),
    ``model_energy`` and, if the store has them, ``reference_energy`` (frame), and ``atoms`` (species).
    One task per chunk of frames on the active dask scheduler. Non-finite positions or reference
    forces raise :class:`EvaluationError` naming the first such frame."""
    import dask

    boxes = check_store(model, ds, path)
    target, ref = _reference_forces(ds, path)
    n = ds.sizes["frame"]
    index = np.arange(n) if frames is None else np.asarray(frames, dtype=np.int64)
    if index.size == 0:
        raise EvaluationError(f"{path}: no frames selected")
    species = [str(s) for s in ds["species"].values]
    codes, order = species_index(species, list(model.species))
    with_energy = model.kind == "conservative"
    box = np.broadcast_to(boxes, (n, 3)) if boxes.ndim == 1 else boxes
    pos = ds["positions"].data
    step = int(chunk_frames or (pos.chunks[0][0] if hasattr(pos, "chunks") else 64))
    model_d = dask.delayed(model, pure=True)
    tasks = []
    for a in range(0, index.size, step):
        idx = index[a:a + step]
        sel = slice(int(idx[0]), int(idx[-1]) + 1) if np.all(np.diff(idx) == 1) else idx
        tasks.append(dask.delayed(_chunk_errors, pure=True)(pos[sel], ref[sel], np.ascontiguousarray(box[idx]),
                                                            model_d, species, codes, with_energy))
    out = np.concatenate(dask.compute(*tasks), axis=0)
    bad = np.flatnonzero(out[:, -1] == 0.0)
    if bad.size:
        raise EvaluationError(f"{path}: frame {int(index[bad[0]])} has non-finite positions or {target} "
                              f"({bad.size} such frame(s)); evaluate frames without them (--frames)")
    s = len(order)
    data = {name: (("frame", "species"), out[:, k * s:(k + 1) * s], {"units": _UNITS[name]})
            for k, name in enumerate(_PER_SPECIES)}
    if with_energy:
        data["model_energy"] = ("frame", out[:, -2], {"units": "eV", "long_name": "model potential energy"})
    if "potential_energy" in ds.variables:
        data["reference_energy"] = ("frame", np.asarray(ds["potential_energy"].values, float)[index],
                                    {"units": "eV", "long_name": "reference potential energy"})
    data["atoms"] = ("species", np.array([np.sum(codes == k) for k in range(s)]), {"units": "1"})
    return xr.Dataset(data, coords={"frame": ("frame", index, {"units": "1"}), "species": list(order)},
                      attrs={"store": str(path), "target": target, "model_kind": model.kind,
                             "n_atoms": len(codes)})


def summarize(errors: list[xr.Dataset] | xr.Dataset) -> dict:
    """Figures from :func:`evaluate_store` results (several stores pooled: sums add, maxima take
    the largest, energies get one offset per store): per species ``relative_rmse``,
    ``force_rmse_eV_per_A``, ``force_mae_eV_per_A``, ``max_atom_error_eV_per_A``,
    ``reference_rms_force_eV_per_A``; ``all`` the same over every atom; ``energy`` (conservative
    models on stores with energies) ``rmse_meV_per_atom`` after a constant offset per store,
    ``offset_eV`` (per store), ``mae_meV_per_atom``, ``frames``; ``frames``; ``worst_frames``: the
    three frames with the largest atom errors (``store`` is the index in ``errors``)."""
    errors = [errors] if isinstance(errors, xr.Dataset) else list(errors)
    species = list(errors[0]["species"].values)
    out: dict = {"frames": int(sum(e.sizes["frame"] for e in errors)), "stores": len(errors), "species": {}}
    tot = np.zeros(4)
    for sp in species:
        sse = sum(float(e["squared_error"].sel(species=sp).sum()) for e in errors)
        yy = sum(float(e["squared_reference"].sel(species=sp).sum()) for e in errors)
        sae = sum(float(e["absolute_error"].sel(species=sp).sum()) for e in errors)
        comps = sum(3 * int(e["atoms"].sel(species=sp)) * e.sizes["frame"] for e in errors)
        worst = max(float(e["max_atom_error"].sel(species=sp).max()) for e in errors)
        if comps == 0:
            continue
        out["species"][sp] = _figures(sse, yy, sae, comps, worst)
        tot += (sse, yy, sae, comps)
    worst = max(float(e["max_atom_error"].max()) for e in errors)
    out["all"] = _figures(*tot[:3], int(tot[3]), worst)
    per_frame = [(float(v), k, int(f)) for k, e in enumerate(errors)
                 for f, v in zip(e["frame"].values, e["max_atom_error"].max("species").values)]
    out["worst_frames"] = [{"store": k, "frame": f, "max_atom_error_eV_per_A": v}
                           for v, k, f in sorted(per_frame, reverse=True)[:3]]
    dev, per_atom = [], []
    offsets = []
    for e in errors:
        if "model_energy" in e and "reference_energy" in e and e.sizes["frame"] >= 2:
            d = e["model_energy"].values - e["reference_energy"].values
            offsets.append(float(np.mean(d)))
            dev.append((d - np.mean(d)) / e.attrs["n_atoms"])
    if dev:
        dev = np.concatenate(dev) * 1e3
        out["energy"] = {"rmse_meV_per_atom": float(np.sqrt(np.mean(dev ** 2))),
                         "mae_meV_per_atom": float(np.mean(np.abs(dev))), "offset_eV": offsets,
                         "frames": int(dev.size)}
    return out


def _figures(sse, yy, sae, comps, worst) -> dict:
    return {"relative_rmse": float(np.sqrt(sse / yy)) if yy > 0 else float("nan"),
            "force_rmse_eV_per_A": float(np.sqrt(sse / comps)), "force_mae_eV_per_A": float(sae / comps),
            "max_atom_error_eV_per_A": float(worst), "reference_rms_force_eV_per_A": float(np.sqrt(yy / comps)),
            "components": int(comps)}


# ---------------------------------------------------------------- the fit's splits
def _store_matches(record: dict, path: Path, ds: xr.Dataset, n_strided: int) -> bool:
    if Path(record.get("path", "")).resolve() == path.resolve():
        return True
    mine = sorted(f.get("sha256") or "" for f in ds.attrs.get("source_files", []))
    theirs = sorted(f.get("sha256") or "" for f in record.get("source_files", []))
    return bool(mine) and all(mine) and mine == theirs and record.get("frames") == n_strided


def fit_split(model: Model, ds: xr.Dataset, path: str | Path, split: str) -> np.ndarray:
    """Frame indices of ``ds`` in ``split`` ("train", "validation", "test") of the fit that made
    ``model``: the store must be one the model was fitted on (its path, or the same source files
    and frame count), and the split is rebuilt from the model's metrics (fractions, shuffle seed,
    frame stride, validation / test stores given or not)."""
    from .fit.gram import Splits, configuration_splits, frame_splits
    from .fit.pipeline import is_configuration_set

    if split not in SPLIT_NAMES:
        raise EvaluationError(f"--split {split!r}: expected one of {SPLIT_NAMES}")
    path = Path(path)
    m, prov = model.metrics, model.provenance
    records = prov.get("stores", [])
    if not records or "splits" not in m:
        raise EvaluationError(f"the model records no fit stores or splits (metrics.splits, provenance.stores); "
                              f"--split {split} needs a model written by `ensemble fit`")
    stride = int(m.get("frame_stride", 1) or 1)
    strided = np.arange(ds.sizes["frame"])[::stride]
    mine = [r for r in records if _store_matches(r, path, ds, strided.size)]
    if not mine:
        known = ", ".join(f"{r.get('path')} ({r.get('role')})" for r in records)
        raise EvaluationError(f"{path}: not a store this model was fitted on ({known}); --split applies only to "
                              "those (evaluate other stores whole)")
    role = mine[0].get("role", "fit")
    if role != "fit":                      # a --validation / --test store: every frame in its split
        if role != split:
            raise EvaluationError(f"{path}: the fit used this store whole as its {role} store; it has no "
                                  f"{split} frames")
        return strided
    fr = {k: float(v) for k, v in m["splits"].items()}
    splits = Splits(**fr)
    lab = (configuration_splits(strided.size, splits, int(m.get("split_seed", 0) or 0)) if is_configuration_set(ds)
           else frame_splits(strided.size, splits))
    roles = {r.get("role") for r in records}
    if "validation" in roles:
        lab[lab == 1] = 0
    if "test" in roles:
        lab[lab == 2] = 0
    return strided[lab == SPLIT_NAMES.index(split)]


# ---------------------------------------------------------------- report
def format_summary(summary: dict, label: str) -> str:
    """A table of :func:`summarize`'s figures (one block per store, or the pooled one)."""
    lines = [f"{label}: {summary['frames']} frames"]
    lines.append(f"  {'species':<8}{'rel. RMSE':>10}{'RMSE':>9}{'MAE':>9}{'max atom':>10}{'ref. RMS':>10}   (eV/Å)")
    rows = list(summary["species"].items()) + [("all", summary["all"])]
    for name, f in rows:
        lines.append(f"  {name:<8}{f['relative_rmse']:>10.4f}{f['force_rmse_eV_per_A']:>9.4f}"
                     f"{f['force_mae_eV_per_A']:>9.4f}{f['max_atom_error_eV_per_A']:>10.3f}"
                     f"{f['reference_rms_force_eV_per_A']:>10.3f}")

    def where(w):
        return f"{w['frame']}" + (f" of store {w['store'] + 1}" if summary["stores"] > 1 else "")

    worst = ", ".join(f"{where(w)} ({w['max_atom_error_eV_per_A']:.3f})" for w in summary["worst_frames"])
    lines.append(f"  largest atom errors in frames {worst} eV/Å")
    e = summary.get("energy")
    if e:
        off = ", ".join(f"{o:.6g}" for o in e["offset_eV"])
        lines.append(f"  energy: RMSE {e['rmse_meV_per_atom']:.3f} meV/atom, MAE {e['mae_meV_per_atom']:.3f} "
                     f"meV/atom over {e['frames']} frames, after a constant offset (model - reference) of {off} eV")
    return "\n".join(lines)
