"""Out-of-core least-squares fit of the agent losses (paper §4-5.2).

Both model kinds are linear in the coefficients (A_s, upper triangle of B_s):

``agent`` (the paper's)
    per species s, one row per (frame, atom of s, xyz); target the reference
    acceleration (Å/fs^2); columns -c/M_s grad_k phi_j (linear) and
    -c/M_s grad_k (phi_j phi_l) (quadratic, halved on the diagonal) with all other
    atoms held fixed; c converts eV/Å/amu to Å/fs^2.
``conservative``
    one energy E = sum_k H_{s_k}(phi_k); rows for every atom, target the reference
    force (eV/Å), columns -dT/dq for every species' terms T (so each atom also feels
    its neighbours' losses). Fitted jointly over species; Gram matrices are kept per
    row species, so per-species weights and per-species errors come from them.

One pass over the store accumulates, per species and split (train / validation /
test, fractions of the time axis), the augmented Gram matrix
``Z^T Z`` of ``Z = [X y]`` — it holds X^T X, X^T y and y^T y — reduced across
frame chunks with dask (``map_blocks`` then a tree ``sum``). Memory is
O(columns^2), independent of the number of frames. Solving, errors and the
backward elimination of weight functions work on submatrices of it only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import dask.array as da
import numpy as np
import xarray as xr

from numba import njit

from ..features import FeatureSpec, frame_terms
from ..invariants import (WeightSet, _weight, check_cutoff, invariants_frames, neighbour_pairs, orthorhombic_box,
                          pair_geometry, species_index)
from .design import (agent_feature_rows, conservative_rows_blas, degree_rows, legendre_gram,
                     support_colmap)
from ..units import EV_PER_ANGSTROM_AMU_TO_ANGSTROM_PER_FS2

__all__ = ["Splits", "GramSet", "SpeciesFit", "JointFit", "frame_splits", "n_columns", "quadratic_index", "agent_design",
           "accumulate_gram", "solve_ridge", "relative_rmse", "fit_species", "backward_elimination",
           "columns_for_weights", "configuration_splits", "shortest_training_distances", "fit_joint",
           "joint_columns"]

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Splits:
    """Fractions of the time axis: discarded (equilibration), train, validation, test (in order)."""

    discard: float = 0.2
    train: float = 0.6
    validation: float = 0.1
    test: float = 0.1

    def __post_init__(self):
        parts = (self.discard, self.train, self.validation, self.test)
        if any(p < 0 for p in parts) or abs(sum(parts) - 1) > 1e-9 or self.train <= 0:
            raise ValueError(f"split fractions must be >= 0, sum to 1 and train > 0; got {parts}")


def frame_splits(n_frames: int, splits: Splits) -> np.ndarray:
    """Split of each frame: -1 discarded, 0 train, 1 validation, 2 test (contiguous in time).

    The paper's 1000 frames with the default fractions: 0-199 discarded, 200-799 train,
    800-899 validation, 900-999 test.
    """
    edges = np.round(np.cumsum([splits.discard, splits.train, splits.validation]) * n_frames).astype(int)
    out = np.full(n_frames, 2, dtype=np.int64)
    idx = np.arange(n_frames)
    out[idx < edges[2]] = 1
    out[idx < edges[1]] = 0
    out[idx < edges[0]] = -1
    return out


def n_columns(p: int, quadratic: bool = True) -> int:
    """Columns of one species' block: P linear + P(P+1)/2 quadratic."""
    return p + (p * (p + 1) // 2 if quadratic else 0)


def quadratic_index(p: int) -> tuple[np.ndarray, np.ndarray]:
    """Feature pairs (j, l), j <= l, in column order of the quadratic block."""
    return np.triu_indices(p)


def agent_design(phi: np.ndarray, grad: np.ndarray, scale: float, quadratic: bool = True) -> np.ndarray:
    """Design rows of the agent model for the atoms of one species in one frame.

    Parameters
    ----------
    phi : (n, P) invariants of those atoms (P = sources x weights, flattened)
    grad : (n, P, 3) their self-gradients d phi[k] / d q_k (1/Å)
    scale : float
        c / M_s: converts eV/Å on an atom of mass M_s to Å/fs^2.

    Returns
    -------
    X : (n * 3, C) rows ordered (atom, xyz); prediction of the acceleration = X @ coef
        with coef = [A (P), B upper triangle (P(P+1)/2)] in eV.
    """
    n, p = phi.shape
    lin = -scale * grad.transpose(0, 2, 1)                            # (n, 3, P)
    if not quadratic:
        return lin.reshape(n * 3, p)
    j, l = quadratic_index(p)
    # d(phi_j phi_l) = phi_j dphi_l + phi_l dphi_j; the diagonal term is 1/2 B_jj phi_j^2
    quad = phi[:, None, j] * grad.transpose(0, 2, 1)[:, :, l] + phi[:, None, l] * grad.transpose(0, 2, 1)[:, :, j]
    quad[:, :, j == l] *= 0.5
    return np.concatenate([lin, -scale * quad], axis=2).reshape(n * 3, -1)


@njit(cache=True)
def agent_rows(phi, grad, acc, scale, quadratic, out):
    """:func:`agent_design` rows plus the target column, written into ``out`` (n * 3, C + 1)
    without temporaries: the hot loop of the agent Gram accumulation."""
    n, p = phi.shape
    for k in range(n):
        for c in range(3):
            row = 3 * k + c
            for j in range(p):
                out[row, j] = -scale * grad[k, j, c]
            if quadratic:
                col = p
                for j in range(p):
                    pj = phi[k, j]
                    gj = grad[k, j, c]
                    out[row, col] = -scale * pj * gj          # diagonal: 1/2 phi_j^2
                    col += 1
                    for l in range(j + 1, p):
                        out[row, col] = -scale * (pj * grad[k, l, c] + phi[k, l] * gj)
                        col += 1
            out[row, out.shape[1] - 1] = acc[k, c]


@njit(cache=True)
def conservative_design(pos, box, species, n_species, kinds, params, cutoff, width, phi, quadratic):
    """Design rows of the conservative model for one frame: (N * 3, S * C), rows (atom, xyz).

    Column block s holds species s's terms T (phi_f linear, phi_j phi_l quadratic with the
    diagonal halved); entry = -d/dq sum_{k of s} T(phi_k). A pair (k, i), i of species a,
    enters phi[k, f = (a, m)] with derivative +g on atom k and -g on atom i,
    g = (w fc)'(r) (q_k - q_i) / r.
    """
    n = pos.shape[0]
    m_w = kinds.shape[0]
    p = n_species * m_w
    c = p + (p * (p + 1) // 2 if quadratic else 0)
    out = np.zeros((n * 3, n_species * c))
    gv = np.empty(3)
    for k in range(n):
        base = species[k] * c
        for i in range(n):
            if i == k:
                continue
            inside, dx, dy, dz, r, fc, dfc = pair_geometry(k, i, pos, box, cutoff, width)
            if not inside:
                continue
            a = species[i]
            for mm in range(m_w):
                w, dw = _weight(kinds[mm], params[mm], r)
                g = (dw * fc + w * dfc) / r
                gv[0] = g * dx
                gv[1] = g * dy
                gv[2] = g * dz
                f = a * m_w + mm
                for cc in range(3):
                    out[3 * k + cc, base + f] -= gv[cc]
                    out[3 * i + cc, base + f] += gv[cc]
                if quadratic:
                    for j in range(p):
                        lo = j if j < f else f
                        hi = f if j < f else j
                        col = base + p + lo * p - lo * (lo - 1) // 2 + (hi - lo)
                        v = phi[k, j]
                        for cc in range(3):
                            out[3 * k + cc, col] -= v * gv[cc]
                            out[3 * i + cc, col] += v * gv[cc]
    return out


@njit(cache=True)
def pair_gradients(pos, box, kinds, params, cutoff, width):
    """G[k, i, m, :] = (w_m fc)'(r_ki) (q_k - q_i) / r_ki for every pair (zero for i = k and
    beyond the cutoff): the derivative of pair (k, i)'s term in phi[k, (s_i, m)] w.r.t. q_k."""
    n = pos.shape[0]
    m_w = kinds.shape[0]
    out = np.zeros((n, n, m_w, 3))
    for k in range(n):
        for i in range(k + 1, n):
            inside, dx, dy, dz, r, fc, dfc = pair_geometry(k, i, pos, box, cutoff, width)
            if not inside:
                continue
            for mm in range(m_w):
                w, dw = _weight(kinds[mm], params[mm], r)
                g = (dw * fc + w * dfc) / r
                out[k, i, mm, 0] = g * dx
                out[k, i, mm, 1] = g * dy
                out[k, i, mm, 2] = g * dz
                out[i, k, mm, 0] = -g * dx
                out[i, k, mm, 1] = -g * dy
                out[i, k, mm, 2] = -g * dz
    return out


def conservative_design_blas(pos, box, codes, n_species, kinds, params, cutoff, width, phi, grad, quadratic=True):
    """Same rows as :func:`conservative_design`, with the O(N^2 M P) part done by BLAS.

    With d phi[k, f=(a, m)] / d q_l = delta_kl grad[l, f] - [s_l = a] G[k, l, m]:
    linear column f of block s, row l:  -[s_l = s] grad[l, f] + [s_l = a] sum_{k of s} G[k, l, m];
    Y_jf[l] = sum_{k of s} phi_j[k] d phi_f[k] / d q_l
            = [s_l = s] phi_j[l] grad[l, f] - [s_l = a] (phi_s^T G_s)[j, l, m]  (one matmul);
    quadratic column (j, f): -(Y_jf + Y_fj), or -Y_ff on the diagonal (1/2 phi_f^2).

    phi (N, P) and grad (N, P, 3) are the frame's invariants and self-gradients.
    """
    n = pos.shape[0]
    m_w = kinds.shape[0]
    p = n_species * m_w
    g = pair_gradients(pos, box, kinds, params, cutoff, width)          # (n, n, M, 3)
    j, l = quadratic_index(p)
    blocks = []
    for s in range(n_species):
        ks = np.flatnonzero(codes == s)
        lin = np.zeros((n, 3, n_species, m_w))
        lin[ks] -= grad[ks].reshape(len(ks), n_species, m_w, 3).transpose(0, 3, 1, 2)
        r = g[ks].sum(axis=0)                                            # (n, M, 3)
        for a in range(n_species):
            la = np.flatnonzero(codes == a)
            lin[la, :, a, :] += r[la].transpose(0, 2, 1)
        cols = [lin.reshape(n * 3, p)]
        if quadratic:
            q = (phi[ks].T @ g[ks].reshape(len(ks), -1)).reshape(p, n, m_w, 3)
            y = np.zeros((p, p, n, 3))
            y[:, :, ks, :] = phi[ks].T[:, None, :, None] * grad[ks].transpose(1, 0, 2)[None]
            for a in range(n_species):
                la = np.flatnonzero(codes == a)
                y[:, a * m_w:(a + 1) * m_w, la, :] -= q[:, la].transpose(0, 2, 1, 3)
            quad = y[j, l] + y[l, j]
            diag = j == l
            quad[diag] *= 0.5
            cols.append(-quad.transpose(1, 2, 0).reshape(n * 3, -1))
        blocks.append(np.concatenate(cols, axis=1))
    return np.concatenate(blocks, axis=1)


def _gram_chunk(pos, acc, box, split, *, codes, n_species, kinds, params, cutoff, width, scales, quadratic,
                batch, kind="agent"):
    """Augmented Gram matrices of one frame chunk: (1, S, 3, C + 1, C + 1) (C over all species
    blocks for the conservative kind; the species axis is then the species of the rows)."""
    pos = np.ascontiguousarray(pos)
    box = np.ascontiguousarray(box.reshape(-1, 3))
    split = split.reshape(-1)
    f = pos.shape[0]
    p = n_species * kinds.shape[0]
    c = n_columns(p, quadratic) * (n_species if kind == "conservative" else 1)
    out = np.zeros((1, n_species, 3, c + 1, c + 1))
    for a in range(0, f, batch):
        b = min(a + batch, f)
        phi, grad = invariants_frames(pos[a:b], np.ascontiguousarray(box[a:b]), codes, n_species, kinds, params,
                                      cutoff, width)
        phi = phi.reshape(b - a, pos.shape[1], p)
        grad = grad.reshape(b - a, pos.shape[1], p, 3)
        for sp in range(3):
            frames = np.flatnonzero(split[a:b] == sp)
            if frames.size == 0:
                continue
            if kind == "conservative":
                xs = [conservative_design_blas(pos[a + t], box[a + t], codes, n_species, kinds, params, cutoff,
                                               width, phi[t], grad[t], quadratic) for t in frames]
                for s in range(n_species):
                    rows = (3 * np.flatnonzero(codes == s)[:, None] + np.arange(3)).ravel()
                    z = np.concatenate([np.concatenate([x[rows], acc[a + t].reshape(-1, 1)[rows]], axis=1)
                                        for x, t in zip(xs, frames)])
                    out[0, s, sp] += z.T @ z
                continue
            for s in range(n_species):
                atoms = np.flatnonzero(codes == s)
                nr = 3 * atoms.size
                z = np.empty((nr * frames.size, c + 1))
                for q, t in enumerate(frames):
                    agent_rows(np.ascontiguousarray(phi[t][atoms]), np.ascontiguousarray(grad[t][atoms]),
                               np.ascontiguousarray(acc[a + t][atoms]), scales[s], quadratic,
                               z[q * nr:(q + 1) * nr])
                out[0, s, sp] += z.T @ z
    return out


def _row_layout(spec: FeatureSpec, kind: str):
    """Where the reduction writes each species' rows: (colmap, keep, twin, orig).

    keep[s]: the Gram matrix's columns of species s's rows, in buffer order. The agent kind: its block
    and the target. The conservative kind: the target first, then only the columns of
    spec.conservative_support(s), the others being zero by construction in those rows (598 of 698
    design columns for the many-body default, 1215 of 1404 in paper mode), less the twins of other
    columns (the cross-species two-body terms counted from either species; their Gram rows and
    columns are copied from ``orig``), written compactly by the row kernels through ``colmap``
    (None for the agent kind)."""
    s_n = spec.n_species
    if kind != "conservative":
        return None, [np.arange(spec.block + 1)] * s_n, np.empty(0, np.int64), np.empty(0, np.int64)
    c = spec.block * s_n
    twin, orig = spec.conservative_twins()
    colmap, support = support_colmap(spec, first=1, drop=twin)
    return colmap, [np.append(c, sup) for sup in support], twin, orig


def _gram_chunk_features(pos, target, box, split, *, codes, spec, scales, kind, batch, prior):
    """Augmented Gram matrices of one frame chunk for any feature spec: (1, S, 3, C + 1, C + 1).

    ``target`` is the reference force (conservative, eV/Å) or acceleration (agent, Å/fs^2); the
    prior's share (``prior`` = (onset, epsilon, decay) or None) is subtracted from it. Atoms are
    taken in species order, so each species' rows are one contiguous block (the Gram matrix does
    not depend on the order of its rows).
    """
    from ..prior import prior_energy_forces

    order = np.argsort(codes, kind="stable")
    codes = np.ascontiguousarray(codes[order])
    pos = np.ascontiguousarray(np.asarray(pos)[:, order])
    target = np.asarray(target)[:, order]
    box = np.ascontiguousarray(box.reshape(-1, 3))
    split = split.reshape(-1)
    f, n = pos.shape[0], pos.shape[1]
    s_n = spec.n_species
    c = spec.block * (s_n if kind == "conservative" else 1)
    out = np.zeros((1, s_n, 3, c + 1, c + 1))
    qj, ql = spec.quadratic_pairs()
    counts = np.bincount(codes, minlength=s_n)
    first = np.concatenate([[0], np.cumsum(counts)])
    # angular columns per monomial degree, turned into Legendre orders once per chunk (legendre_gram)
    degrees = kind == "conservative" and degree_rows(spec)
    colmap, keep, twin, orig = _row_layout(spec, kind)
    # one row buffer and the products, allocated and touched once per chunk (fresh pages fault on
    # first touch, which costs as much as filling them). A batch of frames lies in it species by
    # species: species s's rows of all its frames are one block (zs[s]), frame q's at q * 3 n_s, so
    # the rows are written in place (no copy) and each block is one syrk.
    zbuf = np.zeros((min(batch, f) * 3 * n, max(k.size for k in keep)))
    prods = [np.zeros((k.size, k.size)) for k in keep]
    within = np.arange(n) - first[codes]                 # index of each atom among its species
    sums = {}                                            # (species, split): the products' sum
    for a0 in range(0, f, batch):
        frames = [t for t in range(a0, min(a0 + batch, f)) if split[t] >= 0]
        for sp in range(3):
            sel = [t for t in frames if split[t] == sp]
            if not sel:
                continue
            off = np.concatenate([[0], np.cumsum(len(sel) * 3 * counts)])
            zs = [zbuf[off[s]:off[s + 1], :keep[s].size] for s in range(s_n)]
            for q, t in enumerate(sel):
                terms = frame_terms(pos[t], box[t], codes, spec, angular_values=not degrees)
                y = np.array(target[t], dtype=float)
                if prior is not None:
                    fp = prior_energy_forces(pos[t], box[t], codes, prior[0], prior[1], prior[2],
                                             neighbour_pairs(pos[t], box[t], max(float(prior[0].max()), 1e-3)))[1]
                    y -= fp if kind == "conservative" else fp * scales[codes][:, None]
                if kind == "conservative":
                    rows = off[codes] + q * 3 * counts[codes] + 3 * within
                    conservative_rows_blas(terms, codes, spec, zbuf, rows, legendre=not degrees, colmap=colmap)
                    zbuf[(rows[:, None] + np.arange(3)).ravel(), 0] = y.ravel()
                else:
                    grad = terms.self_gradient(codes, s_n)
                    for s in range(s_n):
                        nr = 3 * counts[s]
                        at = slice(first[s], first[s + 1])
                        agent_feature_rows(np.ascontiguousarray(terms.x[at]), np.ascontiguousarray(grad[at]), qj, ql,
                                           np.ascontiguousarray(y[at]), scales[s], zs[s][q * nr:(q + 1) * nr])
            for s in range(s_n):
                acc = sums.setdefault((s, sp), np.zeros_like(prods[s]))
                acc += np.matmul(zs[s].T, zs[s], out=prods[s])
    for (s, sp), acc in sums.items():
        g = out[0, s, sp]
        g[np.ix_(keep[s], keep[s])] = acc
        g[twin, :] = g[orig, :]
        g[:, twin] = g[:, orig]
    for sp in sorted({sp for _, sp in sums}) if degrees else ():
        out[0, :, sp] = legendre_gram(out[0, :, sp], spec)
    return out


@dataclass(frozen=True)
class GramSet:
    """Reduced augmented Gram matrices ``Z^T Z`` (species, split, C + 1, C + 1) and row counts
    (species, split), with the feature layout needed to interpret them. Gram sets of the same
    layout (e.g. of several stores) add with ``+``: their rows are simply pooled."""

    zz: np.ndarray
    rows: np.ndarray
    species: tuple[str, ...]
    spec: FeatureSpec
    kind: str = "agent"
    shortest_angstrom: np.ndarray | None = None     # (S, S) shortest training distances, if measured
    frames: int = 0

    @property
    def weights(self) -> WeightSet:
        return self.spec.weights

    @property
    def quadratic(self) -> bool:
        return self.spec.n_quadratic > 0

    @property
    def p(self) -> int:
        """Features (linear columns) per species block."""
        return self.spec.n_features

    @property
    def block(self) -> int:
        """Columns of one species' block."""
        return self.spec.block

    @property
    def n_groups(self) -> int:
        return len(self.spec.group_names())

    def parts(self, s: int, split: int, cols: np.ndarray | None = None):
        """(G, b, yy, n) of species ``s`` and ``split`` restricted to columns ``cols``."""
        z = self.zz[s, split]
        c = z.shape[0] - 1
        cols = np.arange(c) if cols is None else np.asarray(cols)
        return z[np.ix_(cols, cols)], z[cols, c], z[c, c], int(self.rows[s, split])

    def __add__(self, other: "GramSet") -> "GramSet":
        if (self.species, self.spec, self.kind) != (other.species, other.spec, other.kind):
            raise ValueError("Gram sets to add must have the same species, features and kind")
        if self.shortest_angstrom is None or other.shortest_angstrom is None:
            short = self.shortest_angstrom if other.shortest_angstrom is None else other.shortest_angstrom
        else:
            short = np.minimum(self.shortest_angstrom, other.shortest_angstrom)
        return GramSet(self.zz + other.zz, self.rows + other.rows, self.species, self.spec, self.kind, short,
                       self.frames + other.frames)


def configuration_splits(n_frames: int, splits: Splits, seed: int = 0) -> np.ndarray:
    """Split of each frame of a configuration set (frames without a time order): a seeded shuffle
    into train / validation / test with the fractions of ``splits`` renormalised without ``discard``
    (a configuration set has no equilibration to discard)."""
    keep = splits.train + splits.validation + splits.test
    edges = np.round(np.cumsum([splits.train, splits.validation]) / keep * n_frames).astype(int)
    order = np.random.default_rng(seed).permutation(n_frames)
    out = np.full(n_frames, 2, dtype=np.int64)
    out[order[:edges[1]]] = 1
    out[order[:edges[0]]] = 0
    return out


def _store_inputs(ds: xr.Dataset, codes: np.ndarray, n_species: int, order, kind: str):
    """Positions, targets (dask), boxes and per-species acceleration scales of a store."""
    masses = np.asarray(ds["masses"].values, dtype=float)
    scales = np.ones(n_species)
    for s in range(n_species):
        m = np.unique(masses[codes == s])
        if m.size > 1:
            raise ValueError(f"atoms of species {order[s]!r} have different masses {m}: one loss per species "
                             "needs one mass")
        if m.size:
            scales[s] = EV_PER_ANGSTROM_AMU_TO_ANGSTROM_PER_FS2 / m[0]
    boxes = orthorhombic_box(ds["cell"].values, "cell")
    n = ds.sizes["frame"]
    box = np.broadcast_to(boxes, (n, 3)) if boxes.ndim == 1 else boxes
    pos = ds["positions"].data
    if kind == "conservative":
        acc = (ds["forces"].data if "forces" in ds else
               ds["accelerations"].data * (masses / EV_PER_ANGSTROM_AMU_TO_ANGSTROM_PER_FS2)[None, :, None])
    else:
        acc = (ds["accelerations"].data if "accelerations" in ds else
               ds["forces"].data * (EV_PER_ANGSTROM_AMU_TO_ANGSTROM_PER_FS2 / masses)[None, :, None])
    if not isinstance(pos, da.Array):
        pos, acc = da.from_array(pos, chunks=(max(n // 4, 1), -1, -1)), da.from_array(acc, chunks=(max(n // 4, 1), -1, -1))
    acc = acc.rechunk({0: pos.chunks[0]})
    return pos, acc, np.ascontiguousarray(box), scales


def _shortest_chunk(pos, box, split, *, codes, n_species):
    sel = split.reshape(-1) == 0
    from ..prior import shortest_distances

    return shortest_distances(np.asarray(pos)[sel], box.reshape(-1, 3)[sel], codes, n_species)[None]


def shortest_training_distances(ds: xr.Dataset, split: np.ndarray, *, species_order: list[str]) -> np.ndarray:
    """Shortest distance (Å) per species pair over the training frames (split == 0) of a store:
    (S, S), inf where no such pair came within 5 Å. One dask pass over the positions."""
    codes, order = species_index(ds["species"].values, species_order)
    pos, _, box, _ = _store_inputs(ds, codes, len(order), order, "agent")
    fchunks = pos.chunks[0]
    s = len(order)
    parts = da.map_blocks(_shortest_chunk, pos, da.from_array(box, chunks=(fchunks, 3))[:, None, :],
                          da.from_array(split, chunks=(fchunks,))[:, None, None], codes=codes, n_species=s,
                          dtype=float, chunks=((1,) * len(fchunks), (s,), (s,)), meta=np.empty((0, 0, 0)))
    return parts.min(axis=0).compute()


def accumulate_gram(ds: xr.Dataset, weights: WeightSet | None = None, *, kind: str = "agent",
                    splits: Splits = Splits(), cutoff_angstrom: float | None = None, width_angstrom: float = 1.0,
                    quadratic: bool = True, species_order: list[str] | None = None, batch_frames: int = 8,
                    features: FeatureSpec | None = None, split: np.ndarray | None = None,
                    prior=None, progress=None) -> GramSet:
    """One pass over a trajectory: a model kind's Gram matrices per species and split.

    ``agent`` targets accelerations (Å/fs^2); ``conservative`` targets forces (eV/Å;
    mass x acceleration when the store has no forces).

    ``features`` (a :class:`FeatureSpec`) replaces ``weights`` / ``cutoff_angstrom`` /
    ``width_angstrom`` / ``quadratic`` for many-body models. ``split`` gives each frame's split
    (-1 discarded, 0 train, 1 validation, 2 test) explicitly; default: ``splits`` as fractions of
    the time axis. With a ``prior`` (:class:`ensemble.prior.ShortRangePrior`) the fit targets are
    the reference minus the prior's forces. ``progress(n)``, if given, is called with the number of
    frames each finished chunk held (in the order they finish).

    ``ds`` may be dask-backed (an opened store): the work runs per frame chunk on
    whatever dask scheduler is active and only the (C + 1)^2 matrices are combined.
    """
    codes, order = species_index(ds["species"].values, species_order)
    n_species = len(order)
    if kind not in ("agent", "conservative"):
        raise ValueError(f"kind must be 'agent' or 'conservative', got {kind!r}")
    if features is None:
        if weights is None:
            raise ValueError("accumulate_gram needs weights or features")
        features = FeatureSpec(n_species, weights, None, "pair" if quadratic else "none", cutoff_angstrom,
                               width_angstrom)
    elif features.n_species != n_species:
        raise ValueError(f"feature layout is for {features.n_species} species, the data has {n_species} ({order})")
    boxes = orthorhombic_box(ds["cell"].values, "cell")
    cutoff, width = check_cutoff(features.cutoff_angstrom, features.width_angstrom, boxes)
    if features.angular is not None:
        check_cutoff(features.angular.cutoff_angstrom, features.angular.cutoff_width_angstrom, boxes)
    n = ds.sizes["frame"]
    split = frame_splits(n, splits) if split is None else np.asarray(split, dtype=np.int64)
    if split.shape != (n,):
        raise ValueError(f"split must have one entry per frame ({n}), got shape {split.shape}")
    pos, acc, box, scales = _store_inputs(ds, codes, n_species, order, kind)
    fchunks = pos.chunks[0]
    box_d = da.from_array(box, chunks=(fchunks, 3))
    split_d = da.from_array(split, chunks=(fchunks,))
    c = features.block * (n_species if kind == "conservative" else 1)
    pair_only = features.angular is None and prior is None and features.quadratic in ("pair", "none")
    if kind == "agent" and pair_only:       # the paper's model: the tuned pair-only kernels
        kinds, params = features.weights.arrays()
        fn = _gram_chunk
        kw = dict(codes=codes, n_species=n_species, kinds=kinds, params=params, cutoff=cutoff, width=width,
                  scales=scales, quadratic=features.quadratic == "pair", batch=batch_frames, kind=kind)
    else:
        fn = _gram_chunk_features
        pr = None if prior is None else (prior.onset_angstrom, prior.epsilon_ev, prior.decay_angstrom)
        kw = dict(codes=codes, spec=features, scales=scales, kind=kind, batch=batch_frames, prior=pr)
    parts = da.map_blocks(fn, pos, acc, box_d[:, None, :], split_d[:, None, None], **kw,
                          dtype=float, chunks=((1,) * len(fchunks), (n_species,), (3,), (c + 1,), (c + 1,)),
                          new_axis=[3, 4], drop_axis=[], meta=np.empty((0, 0, 0, 0, 0)))
    # the chunks' matrices summed pairwise as they finish (not dask's reduction, whose aggregate step
    # concatenates its inputs first: 4 x 95 MB copied for the conservative pair kind, 1 s per 200 frames)
    zz = _sum_chunks(parts, list(fchunks), progress)
    rows = np.array([[3 * np.sum(codes == s) * np.sum(split == sp) for sp in range(3)] for s in range(n_species)])
    return GramSet(zz=zz, rows=rows, species=tuple(order), spec=features, kind=kind,
                   frames=int(np.sum(split >= 0)))


def _add_parts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


def _sum_chunks(parts: da.Array, frames: list[int], progress=None) -> np.ndarray:
    """``parts.sum(axis=0)`` (one (1, ...) block per frame chunk), with ``progress(frames)`` after
    each chunk if given. On a dask.distributed client the chunks are summed on the workers in a fixed
    binary tree (deterministic: the same bits on any cluster; only the total comes back, finished
    chunks are released); on the local scheduler, in order, in groups of one chunk per core."""
    import os

    leaves = list(parts.to_delayed().ravel())
    try:
        from distributed import as_completed, default_client

        client = default_client()
    except (ImportError, ValueError):
        client = None
    if client is None:
        import dask

        total = None
        step = max(os.cpu_count() or 1, 1)
        for g in range(0, len(leaves), step):
            for v in dask.compute(*leaves[g:g + step]):
                total = v if total is None else total + v
            if progress is not None:
                progress(int(sum(frames[g:g + step])))
        return total[0]
    futures = client.compute(leaves)
    chunk_frames = {f.key: n for f, n in zip(futures, frames)}
    # a fixed binary tree over the chunks in order (((0 + 1) + (2 + 3)) + ...): the same sum, bit for
    # bit, whatever the workers and the order they finish in; each sum runs on the workers as soon
    # as its two halves exist, and a chunk is released once it has been added
    level = list(futures)
    while len(level) > 1:
        nxt = [client.submit(_add_parts, a, b, pure=False) for a, b in zip(level[0::2], level[1::2])]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    root = level[0]
    ac = as_completed(futures)
    del futures, level
    try:
        for fut in ac:
            if fut.status == "error":
                fut.result()                # raises the task's exception (e.g. a StoreError)
            n = chunk_frames.pop(fut.key, None)
            if n is not None and progress is not None:
                progress(int(n))
            del fut
        return root.result()[0]
    except BaseException:
        ac.clear()
        root.cancel()
        raise


#: columns are standardized by max(RMS, SCALE_FLOOR x the median column RMS): see solve_ridge
SCALE_FLOOR = 1e-2


def solve_ridge(g: np.ndarray, b: np.ndarray, n_rows: int, ridge: float = 1e-10, *, name: str = "fit",
                cond_warn: float = 1e12, method: str = "eigh", floor: float | None = None) -> tuple[np.ndarray, float]:
    """Least squares from Gram pieces on standardized columns, with ridge regularisation.

    Minimises |X c - y|^2 + ridge * n_rows * |D c|^2 with D the column RMS, floored at ``floor``
    (default :data:`SCALE_FLOOR`, 0.01) times the median column RMS, via an eigendecomposition of
    the standardized Gram matrix (``method="eigh"``: warns when its condition number exceeds
    ``cond_warn``) or a Cholesky factorisation (``"cholesky"``: ~10x faster, for selection trials;
    condition number not computed, NaN; falls back to eigh when the matrix is not positive definite).

    The floor matters for columns the training data barely excite: psi[O; O, O] with both O within
    ~1 Å of the centre has an RMS of ~1e-7 in liquid water, and a ridge relative to that RMS lets
    its coefficient reach 1e7 eV, so an O-O approach that training never saw releases thousands of
    eV. Floored, such coefficients stay ~1e2-1e3; measured on the public DFT water set, the
    validation and test errors do not change in the fourth digit. Returns (coefficients,
    condition number).
    """
    if n_rows == 0:
        raise ValueError(f"{name}: no rows to fit")
    d = np.sqrt(np.maximum(np.diag(g), 0.0) / n_rows)
    live = d > 0
    coef = np.zeros(g.shape[0])
    if not live.any():
        return coef, np.inf
    floor = SCALE_FLOOR if floor is None else floor
    if floor > 0:
        d = np.where(live, np.maximum(d, floor * float(np.median(d[live]))), 0.0)
    gs = g[np.ix_(live, live)] / np.outer(d[live], d[live]) / n_rows
    bs = b[live] / d[live] / n_rows
    if method == "cholesky":
        try:
            lo = np.linalg.cholesky(gs + ridge * np.eye(gs.shape[0]))
            cs = np.linalg.solve(lo.T, np.linalg.solve(lo, bs))
            coef[live] = cs / d[live]
            return coef, float("nan")
        except np.linalg.LinAlgError:
            pass
    w, v = np.linalg.eigh(gs)
    cond = float(w[-1] / max(w[0], np.finfo(float).tiny)) if w[0] > 0 else np.inf
    if cond > cond_warn:
        warnings.warn(f"{name}: standardized Gram matrix is poorly conditioned (condition number {cond:.2e}); "
                      f"ridge {ridge:g} regularises it", RuntimeWarning, stacklevel=2)
    cs = v @ ((v.T @ bs) / (w + ridge))
    coef[live] = cs / d[live]
    return coef, cond


def relative_rmse(g: np.ndarray, b: np.ndarray, yy: float, coef: np.ndarray) -> float:
    """Relative RMSE (paper eq. 5.2) from Gram pieces: sqrt((yy - 2 c.b + c.G.c) / yy)."""
    sse = yy - 2.0 * coef @ b + coef @ g @ coef
    return float(np.sqrt(max(sse, 0.0) / yy)) if yy > 0 else float("nan")


def columns_for_weights(keep: list[int], n_species: int, n_weights: int, quadratic: bool = True) -> np.ndarray:
    """Columns of the kept weight functions (a weight function's invariants for EVERY source)."""
    p = n_species * n_weights
    feat = np.zeros(p, bool)
    for a in range(n_species):
        feat[a * n_weights + np.asarray(keep, dtype=int)] = True
    cols = list(np.flatnonzero(feat))
    if quadratic:
        j, l = quadratic_index(p)
        cols += list(p + np.flatnonzero(feat[j] & feat[l]))
    return np.array(cols, dtype=int)


@dataclass(frozen=True)
class SpeciesFit:
    species: str
    columns: np.ndarray
    coef: np.ndarray          # full-length (C,) with zeros for dropped columns
    errors: dict              # split -> relative RMSE
    condition: float


def fit_species(gram: GramSet, s: int, keep: list[int] | None = None, ridge: float = 1e-10,
                quadratic: bool | None = None, method: str = "eigh", floor: float | None = None) -> SpeciesFit:
    """Fit one species on the train split with the kept groups (weight functions, and angular radial
    functions for many-body layouts); errors on every split."""
    keep = list(range(gram.n_groups)) if keep is None else list(keep)
    quad = gram.quadratic if quadratic is None else quadratic
    if quad and not gram.quadratic:
        raise ValueError("the Gram matrices were built without quadratic columns")
    cols = gram.spec.columns(keep, quad)
    g, b, yy, n = gram.parts(s, 0, cols)
    c, cond = solve_ridge(g, b, n, ridge, name=f"species {gram.species[s]}", method=method, floor=floor)
    errors = {}
    for sp, name in enumerate(SPLITS):
        if gram.rows[s, sp] == 0:
            errors[name] = float("nan")
            continue
        g2, b2, yy2, _ = gram.parts(s, sp, cols)
        errors[name] = relative_rmse(g2, b2, yy2, c)
    full = np.zeros(gram.zz.shape[-1] - 1)
    full[cols] = c
    return SpeciesFit(gram.species[s], cols, full, errors, cond)


def joint_columns(gram: GramSet, keep: list[int], quadratic: bool) -> np.ndarray:
    """Columns of the kept groups in every species block (conservative kind).

    In E = sum_k H_{s_k}(x_k) the linear cross-species two-body terms (phi and rho) are one pair
    potential counted twice: sum_{k of s} A_{s,(a,m)} phi_{(a,m)}[k] and sum_{k of a}
    A_{a,(s,m)} phi_{(s,m)}[k] are the same pair sum, so their columns are identical. Each such
    pair potential is fitted once, in the block of the lower-indexed species (A_{s,(a,m)} with
    a < s stays zero); otherwise the Gram matrix would be exactly singular.
    """
    n_sp = len(gram.species)
    one = gram.spec.columns(keep, quadratic)
    src = gram.spec.two_body_source()
    f = gram.spec.n_features
    lin = one < f
    cols = []
    for s in range(n_sp):
        dup = np.zeros(one.shape, bool)
        dup[lin] = (src[one[lin]] >= 0) & (src[one[lin]] < s)
        cols.append(s * gram.block + one[~dup])
    return np.concatenate(cols)


@dataclass(frozen=True)
class JointFit:
    columns: np.ndarray
    coef: np.ndarray            # (S * C,) with zeros for dropped columns
    errors: dict                # species -> split -> relative RMSE
    species_weights: np.ndarray
    condition: float

    def coef_of(self, s: int, block: int) -> np.ndarray:
        return self.coef[s * block:(s + 1) * block]


def fit_joint(gram: GramSet, keep: list[int] | None = None, ridge: float = 1e-10, quadratic: bool | None = None,
              species_weights=None, method: str = "eigh", floor: float | None = None) -> JointFit:
    """Fit the conservative kind jointly over species on the train split.

    Rows of species r are weighted by ``species_weights[r]`` (default: 1 / RMS reference force
    of r on the train split, so each species' relative error counts alike).
    """
    if gram.kind != "conservative":
        raise ValueError("fit_joint needs Gram matrices of the conservative kind")
    keep = list(range(gram.n_groups)) if keep is None else list(keep)
    quad = gram.quadratic if quadratic is None else quadratic
    cols = joint_columns(gram, keep, quad)
    n_sp = len(gram.species)
    if species_weights is None:
        species_weights = np.array([np.sqrt(gram.rows[r, 0] / gram.zz[r, 0, -1, -1]) if gram.rows[r, 0] else 0.0
                                    for r in range(n_sp)])
    w2 = np.asarray(species_weights, float) ** 2
    g = sum(w2[r] * gram.parts(r, 0, cols)[0] for r in range(n_sp))
    b = sum(w2[r] * gram.parts(r, 0, cols)[1] for r in range(n_sp))
    coef, cond = solve_ridge(g, b, int(gram.rows[:, 0].sum()), ridge, name="conservative fit", method=method,
                             floor=floor)
    errors = {}
    for r in range(n_sp):
        errors[gram.species[r]] = {}
        for sp, name in enumerate(SPLITS):
            g2, b2, yy2, n2 = gram.parts(r, sp, cols)
            errors[gram.species[r]][name] = relative_rmse(g2, b2, yy2, coef) if n2 else float("nan")
    full = np.zeros(gram.zz.shape[-1] - 1)
    full[cols] = coef
    return JointFit(cols, full, errors, np.asarray(species_weights, float), cond)


def _trial(gram: GramSet, s: int | None, keep: list[int], ridge: float, method: str = "cholesky"):
    """(validation error, fit) for the kept groups: species s (agent) or joint (conservative,
    mean of the species' validation errors)."""
    if gram.kind == "conservative":
        fit = fit_joint(gram, keep, ridge, method=method)
        return float(np.nanmean([e["validation"] for e in fit.errors.values()])), fit
    fit = fit_species(gram, s, keep, ridge, method=method)
    return fit.errors["validation"], fit


def backward_elimination(gram: GramSet, s: int | None = None, ridge: float = 1e-10, stop_at: int = 1,
                         groups: list[int] | None = None):
    """The paper's feature selection: repeatedly drop the group whose removal keeps the validation
    error lowest. Groups are the weight functions (a removed weight function removes its invariants
    for every source species) and, for many-body layouts, the angular radial functions (every rho
    and psi using it). Works on Gram submatrices only (trials by Cholesky).

    ``groups``: the candidates for removal (default all); the others are always kept. Returns a list
    of (kept group indices, validation error, fit) from all groups down to ``stop_at`` candidates:
    per species ``s`` for the agent kind, jointly for the conservative kind.
    """
    every = list(range(gram.n_groups))
    fixed = [] if groups is None else [g for g in every if g not in groups]
    cand = every if groups is None else sorted(groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        err, fit = _trial(gram, s, every, ridge, "eigh")
        curve = [(list(every), err, fit)]
        while len(cand) > stop_at:
            trials = [(_trial(gram, s, sorted(fixed + [k for k in cand if k != w]), ridge)[0], w) for w in cand]
            w = min(trials)[1]
            cand = [k for k in cand if k != w]
            err, fit = _trial(gram, s, sorted(fixed + cand), ridge, "eigh")     # the chosen step, exactly
            curve.append((sorted(fixed + cand), err, fit))
    return curve
