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

__all__ = ["agent_feature_rows", "conservative_feature_rows", "conservative_rows"]


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
        a_start, a_nb, a_jac = terms.ang.start, terms.ang.nb, terms.ang.jac
    else:
        a_start, a_nb, a_jac = np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros((0, 1, 3))
    conservative_rows(codes, terms.x, terms.start, terms.nb, terms.geo, terms.g, a_start, a_nb, a_jac, spec.p,
                      spec.block, adj_c, adj_p, adj_n, out)
    return out


# --------------------------------------------------------------------------- conservative rows through BLAS
@njit(cache=True)
def _dense_pair_gradients(start, nb, geo, g, centres, n, out):
    """out (n_c, N, M, 3): entry (k, i) of centre k = centres[c] -> g_m(r_ki) (q_k - q_i), the derivative
    of k's pair term in phi[k, (s_i, m)] w.r.t. q_k (zero where i is not a neighbour). Each centre's
    row is cleared and filled while it is in cache."""
    m_w = g.shape[1]
    for c in range(centres.shape[0]):
        k = centres[c]
        row = out[c]
        row[:] = 0.0
        for e in range(start[k], start[k + 1]):
            i = nb[e]
            d0 = geo[e, 0]
            d1 = geo[e, 1]
            d2 = geo[e, 2]
            for mm in range(m_w):
                gm = g[e, mm]
                row[i, mm, 0] += gm * d0
                row[i, mm, 1] += gm * d1
                row[i, mm, 2] += gm * d2
    return out


@njit(cache=True)
def _scatter_angular(species, a_start, a_nb, a_jac, ranges, n_pair, block, out):
    """Angular linear columns: entry e of centre k (species s) adds -J[e] to k's rows and +J[e] to its
    neighbour's, in block s after the pair features. ``ranges[a]`` holds the [start, end) runs of
    angular features a neighbour of species a can move (rho[a] and the channels with a; (-1, -1)
    pads); k's rows are summed locally and written once."""
    n = a_start.shape[0] - 1
    q = a_jac.shape[1]
    own = np.zeros((3, q))
    for k in range(n):
        if a_start[k] == a_start[k + 1]:
            continue
        base = species[k] * block + n_pair
        own[:] = 0.0
        for e in range(a_start[k], a_start[k + 1]):
            i = a_nb[e]
            rg = ranges[species[i]]
            je = a_jac[e]
            for c in range(3):
                ri = out[3 * i + c]
                ok = own[c]
                for t in range(rg.shape[0]):
                    lo = rg[t, 0]
                    if lo < 0:
                        break
                    for fa in range(lo, rg[t, 1]):
                        v = je[fa, c]
                        ri[base + fa] += v
                        ok[fa] += v
        for c in range(3):
            rk = out[3 * k + c]
            for fa in range(q):
                rk[base + fa] -= own[c, fa]


def relevant_angular_features(basis, n_species: int) -> np.ndarray:
    """(S, R, 2) int64: per neighbour species a, the [start, end) runs of angular features whose
    derivative can be nonzero (rho[a, :] and every psi channel with a among its two species),
    padded with (-1, -1)."""
    nr, nl = basis.n_radial, basis.l_max + 1
    runs = []
    for a in range(n_species):
        idx = [a * nr + r for r in range(nr)]
        for c, (ca, cb, _, _) in enumerate(basis.channels(n_species)):
            if a in (ca, cb):
                idx += [n_species * nr + c * nl + l for l in range(nl)]
        r = []
        for v in idx:
            if r and r[-1][1] == v:
                r[-1][1] = v + 1
            else:
                r.append([v, v + 1])
        runs.append(r)
    width = max(len(r) for r in runs)
    out = np.full((n_species, width, 2), -1, np.int64)
    for a, r in enumerate(runs):
        out[a, :len(r)] = r
    return out


@njit(cache=True)
def _assemble_pair_block(species, s, x, sg, r_s, q_s, qj, ql, n_pair, m_w, col0, colq, out):
    """Write block s's pair columns: linear f = (a, m) and quadratic (j, l) over pair features.

    Row (i, c): linear -d/dq_i sum_{k of s} phi_f[k] = [s_i = a] R_s[i, m] - [s_i = s] SG[i, f];
    Y[j, f] = sum_{k of s} x_j[k] d phi_f[k] / dq_i = [s_i = s] x_j[i] SG[i, f] - [s_i = a] Q_s[j, i, m];
    quadratic column (j, l): -(Y[j, l] + Y[l, j]), diagonal -Y[f, f] (the 1/2 x_f^2 column); linear
    columns from ``col0``, quadratic ones from ``colq``.
    """
    n = x.shape[0]
    nq = qj.shape[0]
    for i in range(n):
        si = species[i]
        own = si == s
        for c in range(3):
            row = 3 * i + c
            for f in range(n_pair):
                a = f // m_w
                m = f - a * m_w
                v = 0.0
                if si == a:
                    v += r_s[i, m, c]
                if own:
                    v -= sg[i, f, c]
                out[row, col0 + f] = v
            for q in range(nq):
                j = qj[q]
                l = ql[q]
                aj = j // m_w
                al = l // m_w
                # Y[j, l]
                y = 0.0
                if own:
                    y += x[i, j] * sg[i, l, c]
                if si == al:
                    y -= q_s[j, i, l - al * m_w, c]
                if j != l:
                    if own:
                        y += x[i, l] * sg[i, j, c]
                    if si == aj:
                        y -= q_s[l, i, j - aj * m_w, c]
                out[row, colq + q] = -y


#: dense per-species pair gradients up to this many float64 values (larger systems scatter instead)
DENSE_PAIR_LIMIT = 2 ** 24


def conservative_rows_blas(terms: FrameTerms, codes: np.ndarray, spec: FeatureSpec, out: np.ndarray) -> np.ndarray:
    """The conservative design of one frame, like :func:`conservative_feature_rows`, with the pair
    block (linear and quadratic) from one BLAS product per centre species, Q_s = X_s^T G_s, and the
    angular linear columns scattered from the Jacobian. Falls back to the scatter kernel when
    quadratic columns involve angular features or the dense gradients would exceed
    :data:`DENSE_PAIR_LIMIT` values. ``out`` (3N, >= S * block) must be zeroed."""
    from ..features import pair_self_gradient

    n = terms.x.shape[0]
    s_n = spec.n_species
    m_w = len(spec.weights)
    p = spec.p
    qj, ql = spec.quadratic_pairs()
    if (qj.size and max(qj.max(), ql.max()) >= p) or max(np.sum(codes == s) for s in range(s_n)) * n * m_w * 3 > DENSE_PAIR_LIMIT:
        return conservative_feature_rows(terms, codes, spec, out)
    sg = pair_self_gradient(terms.start, terms.nb, terms.geo, codes, s_n, terms.g)       # (N, P, 3)
    sizes = [int(np.sum(codes == s)) for s in range(s_n)]
    work = np.empty(max(sizes) * n * m_w * 3)
    for s in range(s_n):
        centres = np.flatnonzero(codes == s)
        g_s = _dense_pair_gradients(terms.start, terms.nb, terms.geo, terms.g, centres, n,
                                    work[:centres.size * n * m_w * 3].reshape(centres.size, n, m_w, 3))
        r_s = g_s.sum(axis=0)
        q_s = (np.ascontiguousarray(terms.x[centres, :p].T) @ g_s.reshape(centres.size, -1)).reshape(p, n, m_w, 3)
        _assemble_pair_block(codes, s, terms.x, sg, r_s, q_s, qj, ql, p, m_w, s * spec.block,
                             s * spec.block + spec.n_features, out)
    if terms.ang is not None:
        rel = spec._cache.get("relevant")
        if rel is None:
            rel = spec._cache["relevant"] = relevant_angular_features(spec.angular, s_n)
        _scatter_angular(codes, terms.ang.start, terms.ang.nb, terms.ang.jac, rel, p, spec.block, out)
    return out
