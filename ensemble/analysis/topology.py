"""Who is bonded to whom, frame by frame: water, hydronium, hydroxide, free protons, hops.

Real ab-initio water is reactive: protons hop between oxygens. So nothing here follows the
molecules of frame 0. In every frame each hydrogen belongs to its nearest oxygen (minimum
image) if that oxygen is within ``bond_max_angstrom`` (1.5 Å by default), else it is *free*;
each oxygen then holds 0, 1, 2, 3, ... hydrogens: OH- (1), H2O (2), H3O+ (3), anything else
counted apart.

Layers: :func:`topology_frames` is the numba kernel (arrays in, arrays out, a block of
frames at a time); :func:`topology` wraps it lazily over frame chunks with
``xarray.apply_ufunc(dask="parallelized")``; :func:`proton_transfers` and
:func:`ion_lifetimes` are derived from the merged per-frame owner series (they need the
whole time axis, so they are computed after merging, never merged themselves).

A proton transfer is a hydrogen whose nearest oxygen changes and *stays* changed for at
least a dwell time (default 20 fs): a proton rattling at the midpoint of an O...H...O
bond, returning within the dwell time, is no event.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr
from numba import njit

from ..errors import UserError
from ..invariants import orthorhombic_box

__all__ = ["AnalysisError", "topology_frames", "topology", "water_indices", "committed_owners",
           "proton_transfers", "ProtonTransfers", "ion_lifetimes", "BOND_MAX_ANGSTROM", "DWELL_FS",
           "static_box"]

BOND_MAX_ANGSTROM = 1.5     #: an H farther than this from every O is free
DWELL_FS = 20.0             #: a new nearest O must hold an H this long to count as a transfer


class AnalysisError(UserError, ValueError):
    """A store cannot be analysed as asked (too few frames, uneven time axis, no oxygen, ...)."""


def static_box(ds: xr.Dataset) -> np.ndarray:
    """Edges (Å) of the store's fixed orthorhombic box; AnalysisError for a per-frame or bad cell."""
    if "cell" not in ds:
        raise AnalysisError("the store has no 'cell' variable; analysis needs a periodic orthorhombic box")
    if "frame" in ds["cell"].dims:
        raise AnalysisError("cell: changes per frame (NPT?); this analysis needs a fixed orthorhombic box")
    try:
        return orthorhombic_box(ds["cell"].values)
    except ValueError as exc:
        raise AnalysisError(str(exc)) from None


def water_indices(species) -> tuple[np.ndarray, np.ndarray]:
    """Atom indices of the oxygens and hydrogens; AnalysisError unless both species are present."""
    labels = np.array([str(s) for s in np.asarray(species)])
    o_idx, h_idx = np.flatnonzero(labels == "O"), np.flatnonzero(labels == "H")
    if o_idx.size == 0 or h_idx.size == 0:
        raise AnalysisError(f"water analysis needs O and H atoms; the store has species "
                            f"{sorted(set(labels.tolist()))} ({o_idx.size} O, {h_idx.size} H)")
    return o_idx, h_idx


@njit(cache=True)
def _mic(dx, box):
    return dx - box * np.rint(dx / box)


@njit(cache=True)
def topology_frames(pos, box, o_idx, h_idx, bond_max):
    """Per-frame topology of water-like systems.

    Parameters
    ----------
    pos : float64 (F, N, 3), Å
    box : float64 (3,), Å (orthorhombic)
    o_idx, h_idx : int64 (nO,), (nH,) atom indices of oxygens and hydrogens
    bond_max : float, Å; an H farther than this from every O is free

    Returns
    -------
    owner : int64 (F, nH)        index (into ``o_idx``) of each H's nearest O
    d1 : float64 (F, nH)         distance to the nearest O, Å (the O-H bond of that H; NaN if
                                 the coordinates are not finite)
    d2 : float64 (F, nH)         distance to the second-nearest O, Å (inf with one O)
    n_h : int64 (F, nO)          bonded H per O (nearest O and within ``bond_max``)
    angle : float64 (F, nO)      H-O-H angle (deg) of an O with exactly two H, else NaN
    hh : float64 (F, nO)         H-H distance (Å) within such a water molecule, else NaN
    h3o_angle : float64 (F, nO)  mean of the three H-O-H angles of an O with three H, else NaN
    oo_min : float64 (F,)        shortest O-O distance, Å (inf with one O)
    """
    nf = pos.shape[0]
    no = o_idx.shape[0]
    nh = h_idx.shape[0]
    owner = np.empty((nf, nh), np.int64)
    d1 = np.empty((nf, nh))
    d2 = np.empty((nf, nh))
    n_h = np.zeros((nf, no), np.int64)
    angle = np.full((nf, no), np.nan)
    hh = np.full((nf, no), np.nan)
    h3o = np.full((nf, no), np.nan)
    oo_min = np.full(nf, np.inf)
    vec = np.empty((nh, 3))             # O -> H vector of each bonded H (minimum image)
    first = np.empty(no, np.int64)      # per O: up to three bonded H (indices into h_idx)
    second = np.empty(no, np.int64)
    third = np.empty(no, np.int64)
    for f in range(nf):
        for j in range(nh):
            h = h_idx[j]
            best = np.inf
            nxt = np.inf
            arg = 0
            bx = 0.0
            by = 0.0
            bz = 0.0
            for m in range(no):
                o = o_idx[m]
                dx = _mic(pos[f, h, 0] - pos[f, o, 0], box[0])
                dy = _mic(pos[f, h, 1] - pos[f, o, 1], box[1])
                dz = _mic(pos[f, h, 2] - pos[f, o, 2], box[2])
                r = np.sqrt(dx * dx + dy * dy + dz * dz)
                if r < best:
                    nxt = best
                    best = r
                    arg = m
                    bx = dx
                    by = dy
                    bz = dz
                elif r < nxt:
                    nxt = r
            owner[f, j] = arg
            d1[f, j] = best if best < np.inf else np.nan     # non-finite coordinates: no nearest O
            d2[f, j] = nxt
            vec[j, 0] = bx
            vec[j, 1] = by
            vec[j, 2] = bz
        for m in range(no):
            first[m] = -1
            second[m] = -1
            third[m] = -1
        for j in range(nh):
            if not d1[f, j] <= bond_max:      # free, or no finite distance
                continue
            m = owner[f, j]
            c = n_h[f, m]
            if c == 0:
                first[m] = j
            elif c == 1:
                second[m] = j
            elif c == 2:
                third[m] = j
            n_h[f, m] = c + 1
        for m in range(no):
            c = n_h[f, m]
            if c == 2:
                a = first[m]
                b = second[m]
                angle[f, m] = _angle_deg(vec, a, b)
                ex = vec[a, 0] - vec[b, 0]
                ey = vec[a, 1] - vec[b, 1]
                ez = vec[a, 2] - vec[b, 2]
                hh[f, m] = np.sqrt(ex * ex + ey * ey + ez * ez)
            elif c == 3:
                h3o[f, m] = (_angle_deg(vec, first[m], second[m]) + _angle_deg(vec, first[m], third[m])
                             + _angle_deg(vec, second[m], third[m])) / 3.0
        for m in range(no - 1):
            o = o_idx[m]
            for n in range(m + 1, no):
                p = o_idx[n]
                dx = _mic(pos[f, p, 0] - pos[f, o, 0], box[0])
                dy = _mic(pos[f, p, 1] - pos[f, o, 1], box[1])
                dz = _mic(pos[f, p, 2] - pos[f, o, 2], box[2])
                r = np.sqrt(dx * dx + dy * dy + dz * dz)
                if r < oo_min[f]:
                    oo_min[f] = r
    return owner, d1, d2, n_h, angle, hh, h3o, oo_min


@njit(cache=True)
def _angle_deg(vec, a, b):
    dot = vec[a, 0] * vec[b, 0] + vec[a, 1] * vec[b, 1] + vec[a, 2] * vec[b, 2]
    na = np.sqrt(vec[a, 0] ** 2 + vec[a, 1] ** 2 + vec[a, 2] ** 2)
    nb = np.sqrt(vec[b, 0] ** 2 + vec[b, 1] ** 2 + vec[b, 2] ** 2)
    c = dot / (na * nb)
    if c > 1.0:
        c = 1.0
    elif c < -1.0:
        c = -1.0
    return np.degrees(np.arccos(c))


def _topology_block(pos, box, o_idx, h_idx, bond_max):
    return topology_frames(np.ascontiguousarray(pos, dtype=np.float64), box, o_idx, h_idx, float(bond_max))


def topology(ds: xr.Dataset, bond_max_angstrom: float = BOND_MAX_ANGSTROM) -> xr.Dataset:
    """Per-frame topology of a trajectory, lazily over frame chunks (see :func:`topology_frames`).

    Returns a Dataset with dims ``frame``, ``hydrogen`` and ``oxygen`` (coords: atom indices):
    ``h_owner`` (atom index of each H's nearest O), ``oh_bond`` (distance to it, Å),
    ``oh_second`` (to the second-nearest O, Å), ``o_hydrogens`` (bonded H per O),
    ``hoh_angle`` (deg, water only), ``hh_intra`` (Å, water only), ``h3o_angle`` (deg,
    hydronium only), ``oo_min`` (Å) and the counts per frame ``n_water``, ``n_hydronium``,
    ``n_hydroxide``, ``n_other_oxygen`` (O with 0 or >= 4 H), ``n_free_hydrogen``,
    ``max_h_per_oxygen``. Every variable has ``attrs["units"]``.
    """
    if not bond_max_angstrom > 0:
        raise AnalysisError(f"bond_max_angstrom must be > 0, got {bond_max_angstrom}")
    o_idx, h_idx = water_indices(ds["species"].values)
    box = static_box(ds)
    no, nh = o_idx.size, h_idx.size
    outs = xr.apply_ufunc(
        _topology_block, ds["positions"], input_core_dims=[["atom", "xyz"]],
        output_core_dims=[["hydrogen"], ["hydrogen"], ["hydrogen"], ["oxygen"], ["oxygen"], ["oxygen"], ["oxygen"], []],
        kwargs={"box": box, "o_idx": o_idx, "h_idx": h_idx, "bond_max": bond_max_angstrom},
        dask="parallelized", output_dtypes=[np.int64, float, float, np.int64, float, float, float, float],
        dask_gufunc_kwargs={"output_sizes": {"hydrogen": nh, "oxygen": no}})
    owner, d1, d2, n_h, angle, hh, h3o, oo_min = outs
    coords = {"hydrogen": ("hydrogen", h_idx), "oxygen": ("oxygen", o_idx)}
    out = xr.Dataset({
        "h_owner": xr.apply_ufunc(lambda x: o_idx[x], owner, dask="parallelized", output_dtypes=[np.int64]),
        "oh_bond": d1, "oh_second": d2, "o_hydrogens": n_h, "hoh_angle": angle, "hh_intra": hh,
        "h3o_angle": h3o, "oo_min": oo_min,
        "n_water": (n_h == 2).sum("oxygen"), "n_hydronium": (n_h == 3).sum("oxygen"),
        "n_hydroxide": (n_h == 1).sum("oxygen"), "n_other_oxygen": ((n_h == 0) | (n_h >= 4)).sum("oxygen"),
        "n_free_hydrogen": (d1 > bond_max_angstrom).sum("hydrogen"), "max_h_per_oxygen": n_h.max("oxygen"),
    }).assign_coords(coords)
    out = out.drop_vars([c for c in ("species", "masses") if c in out.coords])
    meta = {
        "h_owner": ("1", "atom index of the nearest O of each H"),
        "oh_bond": ("angstrom", "O-H bond: distance of each H to its current nearest O"),
        "oh_second": ("angstrom", "distance of each H to its second-nearest O"),
        "o_hydrogens": ("1", f"H within {bond_max_angstrom:g} Å whose nearest O this is"),
        "hoh_angle": ("deg", "H-O-H angle of water molecules (NaN: not H2O in this frame)"),
        "hh_intra": ("angstrom", "H-H distance within water molecules (NaN: not H2O in this frame)"),
        "h3o_angle": ("deg", "mean H-O-H angle of hydronium ions (NaN: not H3O+ in this frame)"),
        "oo_min": ("angstrom", "shortest O-O distance"),
        "n_water": ("1", "number of H2O"), "n_hydronium": ("1", "number of H3O+"),
        "n_hydroxide": ("1", "number of OH-"), "n_other_oxygen": ("1", "number of O with 0 or >= 4 H"),
        "n_free_hydrogen": ("1", f"number of H farther than {bond_max_angstrom:g} Å from every O"),
        "max_h_per_oxygen": ("1", "largest number of H on one O"),
    }
    for name, (units, long) in meta.items():
        out[name].attrs = {"units": units, "long_name": long}
    out["hydrogen"].attrs = {"units": "1", "long_name": "atom index of the H"}
    out["oxygen"].attrs = {"units": "1", "long_name": "atom index of the O"}
    out.attrs = {"bond_max_angstrom": float(bond_max_angstrom)}
    return out


# --------------------------------------------------------------------------- events (derived, whole run)


def committed_owners(owner: np.ndarray, dwell_frames: int) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Owners with short excursions removed, and the transfers.

    ``owner`` (frames, hydrogens) is each H's nearest O per frame. An H's committed owner
    changes only when a new nearest O holds it for at least ``dwell_frames`` consecutive
    frames; the change is dated to the first frame of that stay. Returns the committed owner
    series (same shape) and the events ``(frame, hydrogen column, from O, to O)``. A stay at
    the end of the run shorter than the dwell is not (yet) an event.
    """
    owner = np.asarray(owner)
    if dwell_frames < 1:
        raise AnalysisError(f"the dwell time must cover at least one frame, got {dwell_frames} frames")
    n_frames, n_h = owner.shape
    committed = np.empty_like(owner)
    events = []
    for j in range(n_h):
        series = owner[:, j]
        change = np.flatnonzero(np.diff(series)) + 1
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [n_frames]])
        current = series[0]
        mark = 0
        for s, e in zip(starts, ends):
            value = series[s]
            if value != current and e - s >= dwell_frames:
                committed[mark:s, j] = current
                events.append((int(s), j, int(current), int(value)))
                current, mark = value, s
        committed[mark:, j] = current
    events.sort()
    return committed, events


@dataclass(frozen=True)
class ProtonTransfers:
    """Proton-transfer events of one run (see :func:`proton_transfers`)."""

    events: list               #: (time fs since start, H atom, from O atom, to O atom)
    count: int
    rate_per_molecule_ps: float
    rate_err: float            #: Poisson error of the rate
    molecules: int
    duration_ps: float
    dwell_fs: float


def proton_transfers(stats: xr.Dataset, dwell_fs: float = DWELL_FS) -> ProtonTransfers:
    """Proton transfers in a statistics (or topology) Dataset with ``h_owner`` (frame, hydrogen).

    Rate per molecule (oxygen) per ps over the run's duration; its error is Poisson (sqrt(n)).
    """
    t = np.asarray(stats["time"].values, float)
    owner = np.asarray(stats["h_owner"].values)
    molecules = int(stats.sizes["oxygen"])
    if t.size < 2:
        return ProtonTransfers([], 0, float("nan"), float("nan"), molecules, 0.0, float(dwell_fs))
    dt = float(np.median(np.diff(t)))
    dwell_frames = max(1, int(np.ceil(dwell_fs / dt - 1e-9)))
    _, ev = committed_owners(owner, dwell_frames)
    h_atoms = np.asarray(stats["hydrogen"].values)
    events = [(float(t[f] - t[0]), int(h_atoms[j]), int(a), int(b)) for f, j, a, b in ev]
    duration_ps = float(t[-1] - t[0] + dt) / 1000.0
    rate = len(events) / (molecules * duration_ps)
    return ProtonTransfers(events, len(events), rate, np.sqrt(max(len(events), 1)) / (molecules * duration_ps)
                           if events else 1.0 / (molecules * duration_ps), molecules, duration_ps, float(dwell_fs))


def ion_lifetimes(stats: xr.Dataset, dwell_fs: float = DWELL_FS) -> dict:
    """Lifetimes of H3O+ and OH- from the committed (dwell-filtered) owners, fs.

    An ion episode is a run of frames in which an O holds 3 (H3O+) or 1 (OH-) committed H.
    Episodes cut by the start or end of the run are counted apart (``censored``): their true
    lifetime is longer than seen. Returns per ion: ``mean_fs`` over complete episodes (NaN
    if none), ``complete``, ``censored``, and ``mean_count`` (ions per frame, from the raw
    per-frame topology).
    """
    t = np.asarray(stats["time"].values, float)
    out = {}
    if t.size < 2:
        return {ion: {"mean_fs": float("nan"), "complete": 0, "censored": 0, "mean_count": float("nan")}
                for ion in ("hydronium", "hydroxide")}
    dt = float(np.median(np.diff(t)))
    committed, _ = committed_owners(np.asarray(stats["h_owner"].values), max(1, int(np.ceil(dwell_fs / dt - 1e-9))))
    free = np.asarray(stats["oh_bond"].values) > float(stats.attrs.get("bond_max_angstrom", BOND_MAX_ANGSTROM))
    o_atoms = np.asarray(stats["oxygen"].values)
    lookup = {int(o): m for m, o in enumerate(o_atoms)}
    col = np.vectorize(lookup.get)(committed) if committed.size else committed
    counts = np.zeros((t.size, o_atoms.size), np.int64)
    for f in range(t.size):
        counts[f] = np.bincount(col[f][~free[f]], minlength=o_atoms.size)
    for ion, n in (("hydronium", 3), ("hydroxide", 1)):
        lengths, censored = [], 0
        for m in range(o_atoms.size):
            on = np.concatenate([[False], counts[:, m] == n, [False]])
            edges = np.flatnonzero(np.diff(on.astype(np.int8)))
            for s, e in zip(edges[::2], edges[1::2]):
                if s == 0 or e == t.size:
                    censored += 1
                else:
                    lengths.append((e - s) * dt)
        raw = f"n_{ion}"
        out[ion] = {"mean_fs": float(np.mean(lengths)) if lengths else float("nan"), "complete": len(lengths),
                    "censored": censored,
                    "mean_count": float(np.asarray(stats[raw].values).mean()) if raw in stats else float("nan")}
    return out
