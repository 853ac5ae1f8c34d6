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
