"""Design rows of both model kinds over any :class:`ensemble.features.FeatureSpec`.

Columns of one species block: the F features (linear), then the quadratic pairs (j, l) of
:meth:`FeatureSpec.quadratic_pairs` (x_j x_l, or 1/2 x_f^2 on the diagonal).

``agent``: rows (atom of s, xyz), entry -c/M_s d T(x_k) / d q_k with the other atoms fixed.
``conservative``: rows (every atom, xyz), column block s, entry -d/dq sum_{k of s} T(x_k), built
from the neighbour-list entries of :func:`ensemble.features.frame_terms`: entry e of atom k
moves x[k] by +D d q_k and -D d q_nb, D = g_m d (pair) or the angular Jacobian, so
d(x_j x_l) adds x_l D_j + x_j D_l to both rows with opposite signs. O(entries x columns).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..features import FeatureSpec, FrameTerms

__all__ = ["agent_feature_rows", "conservative_feature_rows", "conservative_rows", "conservative_rows_blas",
           "degree_rows", "legendre_gram", "support_colmap"]


@njit(cache=True)
def agent_feature_rows(x, grad, qj, ql, target, scale, out):
    """Rows (n * 3, C + 1) of n atoms of one species: -scale * d T / d q_k for the linear and the
    quadratic columns, then the target (Å/fs^2) in the last column.

    x (n, F), grad (n, F, 3) = d x[k] / d q_k, target (n, 3)."""
    n, f = x.shape
    nq = qj.shape[0]
    for k in range(n):
        for c in range(3):
            row = 3 * k + c
            for j in range(f):
                out[row, j] = -scale * grad[k, j, c]
            for q in range(nq):
                j = qj[q]
                l = ql[q]
                if j == l:
                    v = x[k, j] * grad[k, j, c]
                else:
                    v = x[k, j] * grad[k, l, c] + x[k, l] * grad[k, j, c]
                out[row, f + q] = -scale * v
            out[row, out.shape[1] - 1] = target[k, c]


@njit(cache=True)
def _scatter(out, k, i, col_lin, base_q, x_k, d0, d1, d2, adj_c, adj_p, adj_n, f):
    """Add one entry's derivative vector of feature f (d x[k] / d q_k = (d0, d1, d2)) to the rows of
    k (minus) and i (plus) for the linear column and every quadratic column of f."""
    out[3 * k, col_lin] -= d0
    out[3 * k + 1, col_lin] -= d1
    out[3 * k + 2, col_lin] -= d2
    out[3 * i, col_lin] += d0
    out[3 * i + 1, col_lin] += d1
    out[3 * i + 2, col_lin] += d2
    for t in range(adj_n[f]):
        col = base_q + adj_c[f, t]
        v = x_k[adj_p[f, t]]
        out[3 * k, col] -= v * d0
        out[3 * k + 1, col] -= v * d1
        out[3 * k + 2, col] -= v * d2
        out[3 * i, col] += v * d0
        out[3 * i + 1, col] += v * d1
        out[3 * i + 2, col] += v * d2


@njit(cache=True)
def conservative_rows(species, x, p_start, p_nb, p_geo, p_g, a_start, a_nb, a_jac, n_pair, block, adj_c, adj_p,
                      adj_n, out):
    """Conservative design (3N, S * block) written into ``out`` (zeroed by the caller; extra trailing
    columns untouched). ``a_start`` of length 1 means no angular block."""
    n = x.shape[0]
    m_w = p_g.shape[1]
    f_all = x.shape[1]
    for k in range(n):
        base = species[k] * block
        base_q = base + f_all
        xk = x[k]
        for e in range(p_start[k], p_start[k + 1]):
            i = p_nb[e]
            fb = species[i] * m_w
            for mm in range(m_w):
                gm = p_g[e, mm]
                if gm == 0.0:
                    continue
                f = fb + mm
                _scatter(out, k, i, base + f, base_q, xk, gm * p_geo[e, 0], gm * p_geo[e, 1], gm * p_geo[e, 2],
                         adj_c, adj_p, adj_n, f)
        if a_start.shape[0] > 1:
            for e in range(a_start[k], a_start[k + 1]):
                i = a_nb[e]
                for fa in range(a_jac.shape[1]):
                    d0 = a_jac[e, fa, 0]
                    d1 = a_jac[e, fa, 1]
                    d2 = a_jac[e, fa, 2]
                    if d0 == 0.0 and d1 == 0.0 and d2 == 0.0:
                        continue
                    f = n_pair + fa
                    _scatter(out, k, i, base + f, base_q, xk, d0, d1, d2, adj_c, adj_p, adj_n, f)


def conservative_feature_rows(terms: FrameTerms, codes: np.ndarray, spec: FeatureSpec,
                              out: np.ndarray | None = None) -> np.ndarray:
    """The conservative design of one frame, (3N, S * block) (``out`` may have extra columns)."""
    n = terms.x.shape[0]
    if out is None:
        out = np.zeros((3 * n, spec.n_species * spec.block))
    adj_c, adj_p, adj_n = spec.adjacency()
    if terms.ang is not None:
        a_start, a_nb, a_jac = terms.ang.start, terms.ang.nb, terms.ang.jacobian()
    else:
        a_start, a_nb, a_jac = np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros((0, 1, 3))
    conservative_rows(codes, terms.x, terms.start, terms.nb, terms.geo, terms.g, a_start, a_nb, a_jac, spec.p,
                      spec.block, adj_c, adj_p, adj_n, out)
    return out


# --------------------------------------------------------------------------- conservative rows through BLAS
@njit(cache=True)
def _assemble_pair_rows(i, species, x, b, n_species, m_w, block, n_features, nqf, avec, bt, rows, colmap, out):
    """Write atom i's three rows of pair columns from its products b (S, P + 1, 3M) (see
    :func:`conservative_pair_rows`); design column j goes to column colmap[s_i, j] of ``out``. The
    quadratic columns are np.triu_indices(nqf) (nqf <= P), each formed in place from Y[j, l] and
    Y[l, j] (the same bits as forming a P x P matrix Y per row and block and gathering from it, which
    this replaced). ``avec`` (P,) and ``bt`` (M, P) are scratch; bt holds B_s[l, (m, c)] with l
    contiguous."""
    p = n_species * m_w
    si = species[i]
    xi = x[i]
    cm = colmap[si]
    lo = si * m_w                 # the features of the atom's own species: B_s[j, m_l] enters Y[j, l]
    hi = lo + m_w
    for c in range(3):
        row = out[rows[i] + c]
        for f in range(p):                   # d phi_f[i] / d q_i, component c
            a = f // m_w
            avec[f] = b[a, p, 3 * (f - a * m_w) + c]
        for s in range(n_species):
            own = si == s
            col0 = s * block
            colq = col0 + n_features
            bs = b[s]
            for f in range(p):
                a = f // m_w
                v = 0.0
                if si == a:
                    v -= bs[p, 3 * (f - a * m_w) + c]
                if own:
                    v -= avec[f]
                j = cm[col0 + f]
                if j >= 0:
                    row[j] = v
            if nqf == 0:
                continue
            for m in range(m_w):
                for l in range(nqf):
                    bt[m, l] = bs[l, 3 * m + c]
            q = 0
            for j in range(nqf):
                xj = xi[j] if own else 0.0
                aj = avec[j]
                bj = bs[j]
                jin = lo <= j < hi
                btj = bt[j - lo] if jin else bt[0]
                for l in range(j, nqf):
                    # Y[j, l] = [s_i = s] x_j[i] A[l] + [s_i = a_l] B_s[j, m_l], and Y[l, j]
                    yjl = xj * avec[l]
                    if lo <= l < hi:
                        yjl += bj[3 * (l - lo) + c]
                    ylj = (xi[l] if own else 0.0) * aj
                    if jin:
                        ylj += btj[l]
                    col = cm[colq + q]
                    if col >= 0:
                        row[col] = -(0.5 if l == j else 1.0) * (yjl + ylj)
                    q += 1


#: atoms per BLAS product when every atom neighbours every other (paper mode)
DENSE_BLOCK = 16


@njit(cache=True)
def conservative_pair_rows(species, x, start, nb, geo, g, n_species, block, n_features, qj, ql, rows, colmap, out):
    """Pair columns (linear and quadratic over pair features) of every species block of the
    conservative design, one atom's three rows at a time, with the sums over neighbours as BLAS
    products (atom i's rows of ``out`` are rows[i] .. rows[i] + 2, design column j in column
    colmap[s_i, j], not written where that is -1; the pair columns are written, not added).

    For atom i and centre species s, B_s[j, (m, c)] = sum over i's entries e with a neighbour k of s
    of x_j[k] g_m(r_ik) (q_i - q_k)_c, and B_s[P, (m, c)] the same with 1 for x_j[k] (= d phi_(s, m)[i]
    / d q_i, the self gradient, since the list is symmetric). Row (i, c) of block s:
    linear f = (a, m): -[s_i = a] B_s[P, m] - [s_i = s] B_a[P, m];
    quadratic (j, l), l = (a_l, m_l): -(Y[j, l] + Y[l, j]) (diagonal -Y[f, f]) with
    Y[j, l] = [s_i = s] x_j[i] B_(a_l)[P, m_l] + [s_i = a_l] B_s[j, m_l], formed per column in place.
    The quadratic columns (qj, ql) must be np.triu_indices over the first pair features (a ValueError
    otherwise).

    B_s = X^T G with X the neighbours' features (and 1), G their g_m d: gathered per atom from its
    neighbour list; when every atom neighbours every other (paper mode) X is the same for all atoms
    and :data:`DENSE_BLOCK` atoms share one product."""
    n = x.shape[0]
    m_w = g.shape[1]
    p = n_species * m_w
    mc = 3 * m_w
    nq = qj.shape[0]
    avec = np.empty(p)
    bt = np.empty((m_w, p))
    nqf = 0                             # the quadratic columns must be np.triu_indices(nqf), nqf <= P
    while nqf * (nqf + 1) // 2 < nq:
        nqf += 1
    triu = nqf * (nqf + 1) // 2 == nq and nqf <= p
    q = 0
    for j in range(nqf if triu else 0):
        for l in range(j, nqf):
            if qj[q] != j or ql[q] != l:
                triu = False
            q += 1
    if not triu:
        raise ValueError("conservative_pair_rows: the quadratic columns (qj, ql) must be np.triu_indices(n) over the "
                         "first n <= P pair features, as FeatureSpec.quadratic_pairs makes them")
    width = 1
    dense = True
    for k in range(n):
        width = max(width, start[k + 1] - start[k])
        if start[k + 1] - start[k] != n - 1:
            dense = False
    if dense:
        for k in range(n):                  # distinct neighbours (no periodic image twice)
            for e in range(start[k], start[k + 1] - 1):
                if nb[e + 1] <= nb[e]:
                    dense = False
    if dense:
        counts = np.zeros(n_species, np.int64)
        slot = np.empty(n, np.int64)
        for k in range(n):
            slot[k] = counts[species[k]]
            counts[species[k]] += 1
        most = counts.max()
        xs = np.zeros((n_species, most, p + 1))
        for k in range(n):
            xr = xs[species[k], slot[k]]
            for j in range(p):
                xr[j] = x[k, j]
            xr[p] = 1.0
        gb = np.zeros((n_species, most, DENSE_BLOCK * mc))
        bb = np.empty((n_species, p + 1, DENSE_BLOCK * mc))
        for i0 in range(0, n, DENSE_BLOCK):
            nbk = min(DENSE_BLOCK, n - i0)
            for ii in range(nbk):
                i = i0 + ii
                gb[species[i], slot[i], ii * mc:(ii + 1) * mc] = 0.0     # an atom is not its own neighbour
                for e in range(start[i], start[i + 1]):
                    k = nb[e]
                    gr = gb[species[k], slot[k]]
                    d0 = geo[e, 0]
                    d1 = geo[e, 1]
                    d2 = geo[e, 2]
                    for m in range(m_w):
                        gm = g[e, m]
                        gr[ii * mc + 3 * m] = gm * d0
                        gr[ii * mc + 3 * m + 1] = gm * d1
                        gr[ii * mc + 3 * m + 2] = gm * d2
            for s in range(n_species):          # the last block's unused columns are stale and unread
                np.dot(xs[s, :counts[s]].T, gb[s, :counts[s]], bb[s])
            for ii in range(nbk):
                _assemble_pair_rows(i0 + ii, species, x, bb[:, :, ii * mc:(ii + 1) * mc], n_species, m_w, block,
                                    n_features, nqf, avec, bt, rows, colmap, out)
        return
    xg = np.empty((n_species, width, p + 1))
    gg = np.empty((n_species, width, mc))
    b = np.zeros((n_species, p + 1, mc))
    cnt = np.zeros(n_species, np.int64)
    for i in range(n):
        cnt[:] = 0
        for e in range(start[i], start[i + 1]):
            k = nb[e]
            s = species[k]
            r = cnt[s]
            cnt[s] = r + 1
            xr = xg[s, r]
            for j in range(p):
                xr[j] = x[k, j]
            xr[p] = 1.0
            gr = gg[s, r]
            d0 = geo[e, 0]
            d1 = geo[e, 1]
            d2 = geo[e, 2]
            for m in range(m_w):
                gm = g[e, m]
                gr[3 * m] = gm * d0
                gr[3 * m + 1] = gm * d1
                gr[3 * m + 2] = gm * d2
        for s in range(n_species):
            if cnt[s] > 0:
                np.dot(xg[s, :cnt[s]].T, gg[s, :cnt[s]], b[s])
            else:
                b[s, :, :] = 0.0
        _assemble_pair_rows(i, species, x, b, n_species, m_w, block, n_features, nqf, avec, bt, rows, colmap, out)


def _quadratic_angular(spec: FeatureSpec) -> bool:
    """Whether some quadratic column involves angular features."""
    qj, ql = spec.quadratic_pairs()
    return bool(qj.size) and max(qj.max(), ql.max()) >= spec.p


def degree_rows(spec: FeatureSpec) -> bool:
    """Whether :func:`conservative_rows_blas` can write the angular psi columns per monomial degree
    (``legendre=False``): the spec has angular features and no quadratic column involves them."""
    return spec.angular is not None and not _quadratic_angular(spec)


def legendre_gram(g: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """Gram matrices (..., C + 1, C + 1) of conservative rows written per monomial degree
    (:func:`degree_rows`) turned into those of the Legendre orders, a new array.

    psi_l = sum_p leg[l, p] psi_p, so Z_l = Z_p B with B the identity but for the block leg^T on the
    (l_max + 1) columns of each channel in each species block, and Z_l^T Z_l = B^T (Z_p^T Z_p) B:
    O(C^2 (l_max + 1)) once per Gram matrix instead of the Legendre sums in every frame's rows."""
    ang = spec.angular
    nl = ang.l_max + 1
    leg = spec.angular_arrays().leg                          # cached on the spec
    first = spec.p + spec.n_species * ang.n_radial           # the first psi column of a species block
    width = len(ang.channels(spec.n_species)) * nl           # its psi columns, channel-major, nl orders each
    if g.shape[-1] != g.shape[-2] or g.shape[-1] < spec.n_species * spec.block:
        raise ValueError(f"Gram matrices of shape {g.shape}: expected (..., C + 1, C + 1) with C >= "
                         f"{spec.n_species * spec.block}")
    out = np.array(g, dtype=float, copy=True)
    lead, c1 = out.shape[:-2], out.shape[-1]
    for s in range(spec.n_species):                          # contiguous runs of columns: slices, no gathers
        at = slice(s * spec.block + first, s * spec.block + first + width)
        cols = out[..., :, at].reshape(lead + (c1, width // nl, nl))
        out[..., :, at] = (cols @ leg.T).reshape(lead + (c1, width))
        rows = out[..., at, :].reshape(lead + (width // nl, nl, c1))
        out[..., at, :] = (leg @ rows).reshape(lead + (width, c1))
    return out


def conservative_rows_blas(terms: FrameTerms, codes: np.ndarray, spec: FeatureSpec, out: np.ndarray,
                           rows: np.ndarray | None = None, legendre: bool = True,
                           colmap: np.ndarray | None = None) -> np.ndarray:
    """The conservative design of one frame, like :func:`conservative_feature_rows`: the pair block
    (linear and quadratic) from :func:`conservative_pair_rows`, the angular linear columns from
    the entry Jacobians. Atom i's rows of ``out`` are rows[i] .. rows[i] + 2 (default 3 i), so a
    caller can lay out several frames and species as it likes; the S * block design columns of
    those rows are written (nothing else is touched, and ``out`` need not be zeroed). Falls back to
    the scatter kernel when quadratic columns involve angular features. ``legendre=False`` (only
    where :func:`degree_rows`) writes the psi columns per monomial degree, for
    :func:`legendre_gram` to turn into Legendre orders once the rows' Gram matrix is summed.

    ``colmap`` (S, S * block) int64: design column j of an atom of species s goes to column
    colmap[s, j] of ``out``, and is not written where that is -1 (default: column j for all), so a
    caller can keep only each species' support (:func:`support_colmap`)."""
    p = spec.p
    n = terms.x.shape[0]
    width = spec.n_species * spec.block
    rows = 3 * np.arange(n, dtype=np.int64) if rows is None else np.ascontiguousarray(rows, dtype=np.int64)
    if colmap is None:
        colmap = np.tile(np.arange(width, dtype=np.int64), (spec.n_species, 1))
    colmap = np.ascontiguousarray(colmap, dtype=np.int64)
    if (out.ndim != 2 or colmap.shape != (spec.n_species, width) or colmap.max() >= out.shape[1]
            or colmap.min() < -1 or rows.shape != (n,) or (n and (rows.min() < 0 or rows.max() + 3 > out.shape[0]))):
        raise ValueError(f"design rows of shape {out.shape} with atom rows from {rows.min() if n else 0} to "
                         f"{rows.max() + 2 if n else 0} and a column map of shape {colmap.shape} into columns "
                         f"{colmap.min()} .. {colmap.max()}: expected >= 3 rows per atom, a map of shape "
                         f"{(spec.n_species, width)} into -1 (skip) .. {out.shape[1] - 1}")
    qj, ql = spec.quadratic_pairs()
    if not legendre and not degree_rows(spec):
        raise ValueError("conservative rows per monomial degree (legendre=False) need angular features that no "
                         f"quadratic column involves; got quadratic={spec.quadratic!r}, angular={spec.angular}")
    fallback = _quadratic_angular(spec)
    if terms.x.shape[1] < (spec.n_features if fallback else p):
        raise ValueError(f"conservative rows: the frame's features have {terms.x.shape[1]} columns, the layout's "
                         f"quadratic columns need {spec.n_features} (frame_terms(..., angular_values=True))")
    if fallback:
        full = conservative_feature_rows(terms, codes, spec)
        for s in range(spec.n_species):
            atoms = np.flatnonzero(codes == s)
            kept = np.flatnonzero(colmap[s] >= 0)
            out[np.ix_((rows[atoms, None] + np.arange(3)).ravel(), colmap[s, kept])] = \
                full[(3 * atoms[:, None] + np.arange(3)).ravel()][:, kept]
        return out
    conservative_pair_rows(codes, terms.x, terms.start, terms.nb, terms.geo, terms.g, spec.n_species, spec.block,
                           spec.n_features, qj, ql, rows, colmap, out)
    if terms.ang is not None:
        terms.ang.add_design_columns(p, spec.block, out, rows, legendre, colmap)
    return out


def support_colmap(spec: FeatureSpec, first: int = 0, drop=()) -> tuple[np.ndarray, list[np.ndarray]]:
    """A column map for :func:`conservative_rows_blas` that writes each species' support
    (:meth:`FeatureSpec.conservative_support`) but the columns ``drop`` compactly from column
    ``first`` on, and the columns written."""
    width = spec.n_species * spec.block
    colmap = np.full((spec.n_species, width), -1, dtype=np.int64)
    support = [np.setdiff1d(spec.conservative_support(s), drop) for s in range(spec.n_species)]
    for s, sup in enumerate(support):
        colmap[s, sup] = first + np.arange(sup.size)
    return colmap, support
