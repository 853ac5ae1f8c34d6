"""numba kernels of the action-derived integrator (:mod:`ensemble.md.action`).

Arrays and scalars in, arrays out. Units: positions Å, velocities Å/fs, masses amu.

Pair features of the learned part of the action (all even in the velocities)::

    K[t, m]    = sum over pairs (i, j) of type t of  D^2 u_m(r_ij)[v_i - v_j]
               = u_m''(r) (rhat . v_ij)^2 + u_m'(r) / r (|v_ij|^2 - (rhat . v_ij)^2)      (1/fs^2)
    F[t, m, n] = sum over pairs (i, j) of type t of  (1/m_i + 1/m_j) u_m'(r) u_n'(r), m <= n   (1/(Å^2 amu))

with u_m(r) = w_m(r) sw(r): a weight function of the invariants (exp, gauss, power) times a
C^3 switch sw (1 below r_c - width, the septic smoothstep down to 0 at r_c), so every feature
and its first derivatives are continuous. K is the directional second derivative of the pair
invariants along the velocities (the V''(q)[v, v] part of the midpoint step's modified
Hamiltonian), F the pair-diagonal part of the squared forces (its F^T M^-1 F part).

Pair types: unordered species pairs, t = type_of[s_i, s_j].

The preconditioner kernels build, per bonded cluster (connected components of pairs closer
than a bond length), dense blocks of the Hessian of the conservative model
E = sum_k H_{s_k}(phi_k) and of the pair features: every atom's own 3x3 block in full, the
blocks between two atoms only when they are in the same cluster.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..invariants import _minimum_image, pair_geometry

__all__ = ["radial3", "radial4", "shell3", "switch3", "switch4", "pair_features", "pair_feature_gradients",
           "find_clusters", "model_cluster_hessian", "feature_cluster_hessians", "newton_blocks", "apply_newton"]


# --------------------------------------------------------------------------- radial functions
@njit(cache=True)
def radial3(kind, p, r):
    """w(r) and its first three derivatives for one weight function (kinds as in invariants)."""
    if kind == 0:
        w = np.exp(-p * r)
        return w, -p * w, p * p * w, -p * p * p * w
    if kind == 1:
        s2 = p * p
        w = np.exp(-r * r / (2.0 * s2))
        return w, -r / s2 * w, (r * r / (s2 * s2) - 1.0 / s2) * w, (3.0 * r / (s2 * s2) - r * r * r / (s2 * s2 * s2)) * w
    w = r ** (-p)
    return w, -p * w / r, p * (p + 1.0) * w / (r * r), -p * (p + 1.0) * (p + 2.0) * w / (r * r * r)


@njit(cache=True)
def radial4(kind, p, sigma, r):
    """w(r) and its first four derivatives: kinds 0-2 as :func:`radial3`, 3 a Gaussian shell at p
    of width sigma. Gaussians use the Hermite form w^(n) = (-1/s)^n He_n(x) w."""
    if kind == 0:
        w = np.exp(-p * r)
        return w, -p * w, p * p * w, -p ** 3 * w, p ** 4 * w
    if kind == 2:
        w = r ** (-p)
        return (w, -p * w / r, p * (p + 1.0) * w / r ** 2, -p * (p + 1.0) * (p + 2.0) * w / r ** 3,
                p * (p + 1.0) * (p + 2.0) * (p + 3.0) * w / r ** 4)
    c = p if kind == 3 else 0.0
    s = sigma if kind == 3 else p
    x = (r - c) / s
    w = np.exp(-0.5 * x * x)
    return (w, -x / s * w, (x * x - 1.0) / s ** 2 * w, (3.0 * x - x ** 3) / s ** 3 * w,
            (x ** 4 - 6.0 * x * x + 3.0) / s ** 4 * w)


@njit(cache=True)
def shell3(center, sigma, r):
    """Gaussian shell exp(-(r - center)^2 / 2 sigma^2) and its first three derivatives."""
    x = (r - center) / sigma
    w = np.exp(-0.5 * x * x)
    return w, -x / sigma * w, (x * x - 1.0) / (sigma * sigma) * w, (3.0 * x - x ** 3) / sigma ** 3 * w


@njit(cache=True)
def switch3(r, cutoff, width):
    """C^3 switch: 1 below cutoff - width, 1 - 35x^4 + 84x^5 - 70x^6 + 20x^7 with
    x = (r - cutoff + width) / width, 0 beyond cutoff; value and three derivatives."""
    s, d1, d2, d3, d4 = switch4(r, cutoff, width)
    return s, d1, d2, d3


@njit(cache=True)
def switch4(r, cutoff, width):
    """:func:`switch3` and its fourth derivative (which jumps at the two knots)."""
    if r >= cutoff:
        return 0.0, 0.0, 0.0, 0.0, 0.0
    x = (r - (cutoff - width)) / width
    if x <= 0.0:
        return 1.0, 0.0, 0.0, 0.0, 0.0
    y = x - 1.0
    s = 1.0 - x ** 4 * (35.0 - 84.0 * x + 70.0 * x * x - 20.0 * x ** 3)
    d1 = 140.0 * x ** 3 * y ** 3 / width
    d2 = 420.0 * x * x * y * y * (2.0 * x - 1.0) / (width * width)
    d3 = 840.0 * x * y * (5.0 * x * x - 5.0 * x + 1.0) / (width ** 3)
    d4 = 840.0 * (2.0 * x - 1.0) * (10.0 * x * x - 10.0 * x + 1.0) / (width ** 4)
    return s, d1, d2, d3, d4


@njit(cache=True)
def _u(kinds, params, sigmas, r, cutoff, width, out):
    """out[m, 0..4] = u_m and its first four derivatives, u_m = w_m sw (kind 3: a Gaussian shell
    at params[m] of width sigmas[m]; kinds 0-2: the invariants' weight functions)."""
    s0, s1, s2, s3, s4 = switch4(r, cutoff, width)
    for m in range(kinds.shape[0]):
        w0, w1, w2, w3, w4 = radial4(kinds[m], params[m], sigmas[m], r)
        out[m, 0] = w0 * s0
        out[m, 1] = w1 * s0 + w0 * s1
        out[m, 2] = w2 * s0 + 2.0 * w1 * s1 + w0 * s2
        out[m, 3] = w3 * s0 + 3.0 * w2 * s1 + 3.0 * w1 * s2 + w0 * s3
        out[m, 4] = w4 * s0 + 4.0 * w3 * s1 + 6.0 * w2 * s2 + 4.0 * w1 * s3 + w0 * s4


# --------------------------------------------------------------------------- pair features
@njit(cache=True)
def pair_features(pos, vel, box, species, type_of, n_types, kinds, params, sigmas, cutoff, width, inv_mass, pairs,
                  use_k, f_pairs):
    """Features and their gradients at one phase-space point (the design columns of the fit).

    Parameters
    ----------
    pos, vel : (N, 3) Å, Å/fs
    box : (3,) Å
    species : (N,) int; type_of : (S, S) int, unordered pair type
    kinds, params, sigmas : (M,) radial functions; cutoff, width : Å (C^3 switch)
    inv_mass : (N,) 1/amu
    pairs : (n_pairs, 2) candidate pairs (each unordered pair once)
    use_k : the K family; f_pairs : (n_fp, 2) the products (m, n) of the F family (none: no F)

    Returns
    -------
    t : (C,) feature values
    dq : (C, N, 3) dT/dq;  dv : (C, N, 3) dT/dv
    Columns: K block (n_types * M, index t * M + m) then F block (n_types * n_fp, t * n_fp + e).
    """
    n = pos.shape[0]
    m_w = kinds.shape[0]
    n_k = n_types * m_w if use_k else 0
    n_mn = f_pairs.shape[0]
    n_f = n_types * n_mn
    c_tot = n_k + n_f
    t = np.zeros(c_tot)
    dq = np.zeros((c_tot, n, 3))
    dv = np.zeros((c_tot, n, 3))
    u = np.empty((m_w, 5))
    rh = np.empty(3)
    vv = np.empty(3)
    for q in range(pairs.shape[0]):
        i = pairs[q, 0]
        j = pairs[q, 1]
        dx, dy, dz = _minimum_image(i, j, pos, box)
        r2 = dx * dx + dy * dy + dz * dz
        if r2 >= cutoff * cutoff:
            continue
        r = np.sqrt(r2)
        rh[0] = dx / r
        rh[1] = dy / r
        rh[2] = dz / r
        for c in range(3):
            vv[c] = vel[i, c] - vel[j, c]
        s = rh[0] * vv[0] + rh[1] * vv[1] + rh[2] * vv[2]
        v2 = vv[0] * vv[0] + vv[1] * vv[1] + vv[2] * vv[2]
        tt = type_of[species[i], species[j]]
        _u(kinds, params, sigmas, r, cutoff, width, u)
        if use_k:
            for m in range(m_w):
                col = tt * m_w + m
                u1 = u[m, 1]
                u2 = u[m, 2]
                u3 = u[m, 3]
                t[col] += u2 * s * s + u1 / r * (v2 - s * s)
                for c in range(3):
                    perp = (vv[c] - s * rh[c]) / r          # d s / d q_i
                    # d/dq_i of u'' s^2 + (u'/r)(v^2 - s^2)
                    g = (u3 * s * s * rh[c] + 2.0 * u2 * s * perp
                         + (u2 / r - u1 / (r * r)) * (v2 - s * s) * rh[c] - 2.0 * u1 / r * s * perp)
                    dq[col, i, c] += g
                    dq[col, j, c] -= g
                    gv = 2.0 * (u2 * s * rh[c] + u1 / r * (vv[c] - s * rh[c]))
                    dv[col, i, c] += gv
                    dv[col, j, c] -= gv
        mu = inv_mass[i] + inv_mass[j]
        for e in range(n_mn):
            m = f_pairs[e, 0]
            mm = f_pairs[e, 1]
            col = n_k + tt * n_mn + e
            t[col] += mu * u[m, 1] * u[mm, 1]
            g = mu * (u[m, 2] * u[mm, 1] + u[m, 1] * u[mm, 2])
            for c in range(3):
                dq[col, i, c] += g * rh[c]
                dq[col, j, c] -= g * rh[c]
    return t, dq, dv


@njit(cache=True)
def pair_feature_gradients(pos, vel, box, species, type_of, kinds, params, sigmas, cutoff, width, inv_mass, pairs,
                           a_k, f_pairs, a_f):
    """sum_c a_c dT_c/dq and sum_c a_c dT_c/dv (N, 3), and sum_c a_c T_c: what the map needs.

    ``a_k`` (n_types, M) multiplies K[t, m]; ``a_f`` (n_types, n_fp) multiplies F[t, e], the
    product of the radial derivatives f_pairs[e].
    """
    n = pos.shape[0]
    m_w = kinds.shape[0]
    gq = np.zeros((n, 3))
    gv = np.zeros((n, 3))
    total = 0.0
    u = np.empty((m_w, 5))
    rh = np.empty(3)
    vv = np.empty(3)
    for q in range(pairs.shape[0]):
        i = pairs[q, 0]
        j = pairs[q, 1]
        dx, dy, dz = _minimum_image(i, j, pos, box)
        r2 = dx * dx + dy * dy + dz * dz
        if r2 >= cutoff * cutoff:
            continue
        r = np.sqrt(r2)
        rh[0] = dx / r
        rh[1] = dy / r
        rh[2] = dz / r
        for c in range(3):
            vv[c] = vel[i, c] - vel[j, c]
        s = rh[0] * vv[0] + rh[1] * vv[1] + rh[2] * vv[2]
        v2 = vv[0] * vv[0] + vv[1] * vv[1] + vv[2] * vv[2]
        tt = type_of[species[i], species[j]]
        _u(kinds, params, sigmas, r, cutoff, width, u)
        u1 = 0.0
        u2 = 0.0
        u3 = 0.0
        for m in range(m_w):
            a = a_k[tt, m]
            u1 += a * u[m, 1]
            u2 += a * u[m, 2]
            u3 += a * u[m, 3]
        w1 = 0.0                    # sum a_mn u_m' u_n'  and its r-derivative
        w2 = 0.0
        for e in range(f_pairs.shape[0]):
            m = f_pairs[e, 0]
            mm = f_pairs[e, 1]
            a = a_f[tt, e]
            w1 += a * u[m, 1] * u[mm, 1]
            w2 += a * (u[m, 2] * u[mm, 1] + u[m, 1] * u[mm, 2])
        mu = inv_mass[i] + inv_mass[j]
        total += u2 * s * s + u1 / r * (v2 - s * s) + mu * w1
        for c in range(3):
            perp = (vv[c] - s * rh[c]) / r
            g = (u3 * s * s * rh[c] + 2.0 * u2 * s * perp + (u2 / r - u1 / (r * r)) * (v2 - s * s) * rh[c]
                 - 2.0 * u1 / r * s * perp + mu * w2 * rh[c])
            gq[i, c] += g
            gq[j, c] -= g
            h = 2.0 * (u2 * s * rh[c] + u1 / r * (vv[c] - s * rh[c]))
            gv[i, c] += h
            gv[j, c] -= h
    return gq, gv, total


# --------------------------------------------------------------------------- clusters
@njit(cache=True)
def find_clusters(pos, box, pairs, bond_angstrom):
    """Connected components of the graph of pairs closer than ``bond_angstrom`` (union-find).

    Returns (members, offsets, cluster_of): atoms of cluster c are members[offsets[c]:offsets[c+1]]
    (ascending), clusters ordered by their first atom.
    """
    n = pos.shape[0]
    parent = np.arange(n)
    b2 = bond_angstrom * bond_angstrom
    for q in range(pairs.shape[0]):
        i = pairs[q, 0]
        j = pairs[q, 1]
        dx, dy, dz = _minimum_image(i, j, pos, box)
        if dx * dx + dy * dy + dz * dz >= b2:
            continue
        a = i
        while parent[a] != a:
            a = parent[a]
        b = j
        while parent[b] != b:
            b = parent[b]
        if a != b:
            if a < b:
                parent[b] = a
            else:
                parent[a] = b
    root = np.empty(n, np.int64)
    for k in range(n):
        a = k
        while parent[a] != a:
            a = parent[a]
        root[k] = a
    label = -np.ones(n, np.int64)
    n_cl = 0
    for k in range(n):
        if label[root[k]] < 0:
            label[root[k]] = n_cl
            n_cl += 1
    cluster_of = np.empty(n, np.int64)
    counts = np.zeros(n_cl + 1, np.int64)
    for k in range(n):
        cluster_of[k] = label[root[k]]
        counts[cluster_of[k] + 1] += 1
    offsets = np.cumsum(counts)
    fill = offsets[:-1].copy()
    members = np.empty(n, np.int64)
    for k in range(n):
        c = cluster_of[k]
        members[fill[c]] = k
        fill[c] += 1
    return members, offsets, cluster_of


@njit(cache=True)
def _block_offsets(offsets):
    n_cl = offsets.shape[0] - 1
    boff = np.zeros(n_cl + 1, np.int64)
    for c in range(n_cl):
        s = 3 * (offsets[c + 1] - offsets[c])
        boff[c + 1] = boff[c] + s * s
    return boff


@njit(cache=True)
def _add_pair_block(flat, boff, offsets, cluster_of, slot, i, j, d1, d2, rh, r, scale_i, scale_j, scale_ij):
    """Add the Hessian of a pair function f(r_ij) (f' = d1, f'' = d2) to the cluster matrices:
    own blocks of i and j always (times scale_i, scale_j), the (i, j) blocks when both are in one
    cluster (times scale_ij). ``slot[k]`` is atom k's position in its cluster."""
    ci = cluster_of[i]
    cj = cluster_of[j]
    ni = 3 * (offsets[ci + 1] - offsets[ci])
    nj = 3 * (offsets[cj + 1] - offsets[cj])
    for a in range(3):
        for b in range(3):
            blk = d2 * rh[a] * rh[b] + d1 / r * ((1.0 if a == b else 0.0) - rh[a] * rh[b])
            flat[boff[ci] + (3 * slot[i] + a) * ni + 3 * slot[i] + b] += scale_i * blk
            flat[boff[cj] + (3 * slot[j] + a) * nj + 3 * slot[j] + b] += scale_j * blk
            if ci == cj:
                flat[boff[ci] + (3 * slot[i] + a) * ni + 3 * slot[j] + b] -= scale_ij * blk
                flat[boff[ci] + (3 * slot[j] + a) * ni + 3 * slot[i] + b] -= scale_ij * blk


@njit(cache=True)
def model_cluster_hessian(pos, box, species, n_species, kinds, params, cutoff, width, pairs, dh, b_mat,
                          members, offsets, cluster_of, r_short):
    """Cluster blocks of the Hessian (eV/Å^2) of E = sum_k H_{s_k}(phi_k), H quadratic.

    d2E = sum_k [ sum_f dh[k, f] d2 phi_kf + (d phi_k)^T B_{s_k} (d phi_k) ]. Kept: pairs closer
    than ``r_short`` (the stiff part); every atom's own block in full from those pairs; the
    blocks between atoms of one cluster, with the B coupling through every atom of that cluster.
    ``dh`` (N, P) = dH/dphi at the current invariants; ``b_mat`` (S, P, P).

    Returns the flat cluster matrices and their offsets (cluster c: a (3 n_c, 3 n_c) row-major
    block at flat[boff[c]:boff[c + 1]]).
    """
    n = pos.shape[0]
    m_w = kinds.shape[0]
    p = n_species * m_w
    boff = _block_offsets(offsets)
    flat = np.zeros(boff[-1])
    slot = np.empty(n, np.int64)
    for c in range(offsets.shape[0] - 1):
        for x in range(offsets[c], offsets[c + 1]):
            slot[members[x]] = x - offsets[c]
    g_self = np.zeros((n, p, 3))             # d phi_k / d q_k from the short pairs
    up = np.empty(m_w)
    rh = np.empty(3)
    for q in range(pairs.shape[0]):
        i = pairs[q, 0]
        j = pairs[q, 1]
        inside, dx, dy, dz, r, fc, dfc = pair_geometry(i, j, pos, box, cutoff, width)
        if not inside or r >= r_short:
            continue
        rh[0] = dx / r
        rh[1] = dy / r
        rh[2] = dz / r
        ai = species[j] * m_w                # phi_i rows fed by j
        aj = species[i] * m_w
        d1 = 0.0
        d2 = 0.0
        x = (r - (cutoff - width)) / width if cutoff > 0.0 else -1.0
        ddfc = (-6.0 + 12.0 * x) / (width * width) if x > 0.0 else 0.0
        for m in range(m_w):
            w0, w1, w2, w3 = radial3(kinds[m], params[m], r)
            u1 = w1 * fc + w0 * dfc
            u2 = w2 * fc + 2.0 * w1 * dfc + w0 * ddfc
            cc = dh[i, ai + m] + dh[j, aj + m]
            d1 += cc * u1
            d2 += cc * u2
            up[m] = u1
            for c in range(3):
                g_self[i, ai + m, c] += u1 * rh[c]
                g_self[j, aj + m, c] -= u1 * rh[c]
        _add_pair_block(flat, boff, offsets, cluster_of, slot, i, j, d1, d2, rh, r, 1.0, 1.0, 1.0)
        # phi_j depends on q_i through row (s_i, m) only: a rank-1 term on i's own block; same for i
        bj = 0.0
        bi = 0.0
        for m in range(m_w):
            for mm in range(m_w):
                bj += b_mat[species[j], aj + m, aj + mm] * up[m] * up[mm]
                bi += b_mat[species[i], ai + m, ai + mm] * up[m] * up[mm]
        ci = cluster_of[i]
        cj = cluster_of[j]
        ni = 3 * (offsets[ci + 1] - offsets[ci])
        nj = 3 * (offsets[cj + 1] - offsets[cj])
        for a in range(3):
            for b in range(3):
                flat[boff[ci] + (3 * slot[i] + a) * ni + 3 * slot[i] + b] += bj * rh[a] * rh[b]
                flat[boff[cj] + (3 * slot[j] + a) * nj + 3 * slot[j] + b] += bi * rh[a] * rh[b]
    # (d phi_k)^T B (d phi_k) within each cluster: k's own gradient and its pairs to cluster members
    for c in range(offsets.shape[0] - 1):
        nc = offsets[c + 1] - offsets[c]
        n3 = 3 * nc
        base = boff[c]
        for z in range(nc):
            k = members[offsets[c] + z]
            bk = b_mat[species[k]]
            # gradient of phi_k with respect to each cluster member y: (P, 3), sparse for y != k
            gk = np.zeros((nc, p, 3))
            for c3 in range(3):
                for f in range(p):
                    gk[z, f, c3] = g_self[k, f, c3]
            for y in range(nc):
                if y == z:
                    continue
                l = members[offsets[c] + y]
                inside, dx, dy, dz, r, fc, dfc = pair_geometry(k, l, pos, box, cutoff, width)
                if not inside or r >= r_short:
                    continue
                al = species[l] * m_w
                for m in range(m_w):
                    w0, w1, w2, w3 = radial3(kinds[m], params[m], r)
                    u1 = w1 * fc + w0 * dfc
                    gk[y, al + m, 0] = -u1 * dx / r
                    gk[y, al + m, 1] = -u1 * dy / r
                    gk[y, al + m, 2] = -u1 * dz / r
            bg = np.zeros((nc, p, 3))        # B_k gk
            for y in range(nc):
                for f in range(p):
                    for g in range(p):
                        bfg = bk[f, g]
                        if bfg != 0.0:
                            for c3 in range(3):
                                bg[y, f, c3] += bfg * gk[y, g, c3]
            for x in range(nc):
                for y in range(nc):
                    if x == y and x != z:
                        continue          # already added as rank-1 terms in the pair loop
                    for a in range(3):
                        for b in range(3):
                            s = 0.0
                            for f in range(p):
                                s += gk[x, f, a] * bg[y, f, b]
                            flat[base + (3 * x + a) * n3 + 3 * y + b] += s
    return flat, boff


@njit(cache=True)
def _add_block(flat, boff, offsets, cluster_of, slot, i, j, blk):
    """Add a pair's 3x3 second-derivative block B = d2 f / (dx dy) of a function of the pair's
    separations x_i - x_j, y_i - y_j to the cluster matrices: +B on (i, i) and (j, j), -B on
    (i, j) and (j, i); the cross blocks only when i and j are in one cluster."""
    ci = cluster_of[i]
    cj = cluster_of[j]
    ni = 3 * (offsets[ci + 1] - offsets[ci])
    nj = 3 * (offsets[cj + 1] - offsets[cj])
    for a in range(3):
        for b in range(3):
            flat[boff[ci] + (3 * slot[i] + a) * ni + 3 * slot[i] + b] += blk[a, b]
            flat[boff[cj] + (3 * slot[j] + a) * nj + 3 * slot[j] + b] += blk[a, b]
            if ci == cj:
                flat[boff[ci] + (3 * slot[i] + a) * ni + 3 * slot[j] + b] -= blk[a, b]
                flat[boff[ci] + (3 * slot[j] + a) * ni + 3 * slot[i] + b] -= blk[a, b]


@njit(cache=True)
def feature_cluster_hessians(pos, vel, box, species, type_of, kinds, params, sigmas, cutoff, width, inv_mass, pairs,
                             a_k, f_pairs, a_f, members, offsets, cluster_of):
    """Cluster blocks of the second derivatives of the learned part sum_c a_c T_c: (tqq, tvq,
    tvv, boff), tvq[v row, q column]. Same layout as :func:`model_cluster_hessian`.

    Per pair, with d = q_i - q_j, r = |d|, n = d / r, P = I - n n^T, w = v_i - v_j, s = n . w,
    the K term is k = A s^2 + B (w.w - s^2), A = U'', B = U'/r (U = sum_m a_m u_m):
    d2k/dw2 = 2 (A n n^T + B P); d2k/dw dd = 2 (A' - B') s n n^T + 2 (A - B)(n (Pw)^T + s P) / r
    + 2 B' w n^T; d2k/dd2 from the gradient alpha n + beta Pw (alpha = A' s^2 + B'(w.w - s^2),
    beta = 2 (A - B) s / r). The F term is a function of r only.
    """
    n_at = pos.shape[0]
    m_w = kinds.shape[0]
    boff = _block_offsets(offsets)
    tqq = np.zeros(boff[-1])
    tvq = np.zeros(boff[-1])
    tvv = np.zeros(boff[-1])
    slot = np.empty(n_at, np.int64)
    for c in range(offsets.shape[0] - 1):
        for x in range(offsets[c], offsets[c + 1]):
            slot[members[x]] = x - offsets[c]
    u = np.empty((m_w, 5))
    nv = np.empty(3)
    w = np.empty(3)
    pw = np.empty(3)
    bqq = np.empty((3, 3))
    bvq = np.empty((3, 3))
    bvv = np.empty((3, 3))
    for q in range(pairs.shape[0]):
        i = pairs[q, 0]
        j = pairs[q, 1]
        dx, dy, dz = _minimum_image(i, j, pos, box)
        r2 = dx * dx + dy * dy + dz * dz
        if r2 >= cutoff * cutoff:
            continue
        r = np.sqrt(r2)
        nv[0] = dx / r
        nv[1] = dy / r
        nv[2] = dz / r
        for c in range(3):
            w[c] = vel[i, c] - vel[j, c]
        s = nv[0] * w[0] + nv[1] * w[1] + nv[2] * w[2]
        w2 = w[0] * w[0] + w[1] * w[1] + w[2] * w[2]
        for c in range(3):
            pw[c] = w[c] - s * nv[c]
        tt = type_of[species[i], species[j]]
        _u(kinds, params, sigmas, r, cutoff, width, u)
        u1 = 0.0
        u2 = 0.0
        u3 = 0.0
        u4 = 0.0
        for m in range(m_w):
            a = a_k[tt, m]
            u1 += a * u[m, 1]
            u2 += a * u[m, 2]
            u3 += a * u[m, 3]
            u4 += a * u[m, 4]
        ca = u2                                   # A, A', A''
        ca1 = u3
        ca2 = u4
        cb = u1 / r                               # B, B', B''
        cb1 = u2 / r - u1 / r ** 2
        cb2 = u3 / r - 2.0 * u2 / r ** 2 + 2.0 * u1 / r ** 3
        alpha = ca1 * s * s + cb1 * (w2 - s * s)
        beta = 2.0 * (ca - cb) * s / r
        dbeta_n = 2.0 * ((ca1 - cb1) * s / r - (ca - cb) * s / (r * r))
        dbeta_p = 2.0 * (ca - cb) / (r * r)
        g1 = 0.0                                  # the F term: mu W(r), W = sum a u_m' u_n'
        g2 = 0.0
        for e in range(f_pairs.shape[0]):
            m = f_pairs[e, 0]
            mm = f_pairs[e, 1]
            a = a_f[tt, e]
            g1 += a * (u[m, 2] * u[mm, 1] + u[m, 1] * u[mm, 2])
            g2 += a * (u[m, 3] * u[mm, 1] + 2.0 * u[m, 2] * u[mm, 2] + u[m, 1] * u[mm, 3])
        mu = inv_mass[i] + inv_mass[j]
        for a in range(3):
            for b in range(3):
                pab = (1.0 if a == b else 0.0) - nv[a] * nv[b]
                bvv[a, b] = 2.0 * (ca * nv[a] * nv[b] + cb * pab)
                bvq[a, b] = (2.0 * (ca1 - cb1) * s * nv[a] * nv[b] + 2.0 * (ca - cb) * (nv[a] * pw[b] + s * pab) / r
                             + 2.0 * cb1 * w[a] * nv[b])
                bqq[a, b] = (nv[a] * ((ca2 * s * s + cb2 * (w2 - s * s)) * nv[b] + 2.0 * (ca1 - cb1) * s * pw[b] / r)
                             + alpha * pab / r
                             + pw[a] * (dbeta_n * nv[b] + dbeta_p * pw[b])
                             + beta * (-s * pab / r - nv[a] * pw[b] / r)
                             + mu * (g2 * nv[a] * nv[b] + g1 / r * pab))
        _add_block(tqq, boff, offsets, cluster_of, slot, i, j, bqq)
        _add_block(tvq, boff, offsets, cluster_of, slot, i, j, bvq)
        _add_block(tvv, boff, offsets, cluster_of, slot, i, j, bvv)
    return tqq, tvq, tvv, boff


@njit(cache=True)
def newton_blocks(hq, tqq, tvq, tvv, boff, members, offsets, inv_mass, h):
    """Per cluster, the inverse of the Jacobian of the midpoint equations (unknowns q_bar, v_bar):

        [[I - (h^3/2) M^-1 T_vq,        -(h/2) (I + h^2 M^-1 T_vv)],
         [(h/2) M^-1 (V'' + h^2 T_qq),  I + (h^3/2) M^-1 T_vq^T    ]]

    ``hq`` the cluster blocks of V'' (amu/fs^2), the T blocks from
    :func:`feature_cluster_hessians`. Returns the inverses, flat, cluster c at
    4 * boff[c] (a (6 n_c, 6 n_c) row-major block)."""
    inv = np.zeros(4 * boff[-1])
    half = 0.5 * h
    c3 = 0.5 * h ** 3
    for c in range(offsets.shape[0] - 1):
        nc = offsets[c + 1] - offsets[c]
        n3 = 3 * nc
        jac = np.zeros((2 * n3, 2 * n3))
        for x in range(n3):
            mi = inv_mass[members[offsets[c] + x // 3]]
            jac[x, x] += 1.0
            jac[n3 + x, n3 + x] += 1.0
            jac[x, n3 + x] -= half
            for y in range(n3):
                k = boff[c] + x * n3 + y
                kt = boff[c] + y * n3 + x
                jac[x, y] -= c3 * mi * tvq[k]
                jac[x, n3 + y] -= half * h * h * mi * tvv[k]
                jac[n3 + x, y] += half * mi * (hq[k] + h * h * tqq[k])
                jac[n3 + x, n3 + y] += c3 * mi * tvq[kt]
        ji = np.linalg.inv(jac)
        base = 4 * boff[c]
        for x in range(2 * n3):
            for y in range(2 * n3):
                inv[base + x * 2 * n3 + y] = ji[x, y]
    return inv


@njit(cache=True)
def apply_newton(inv, boff, members, offsets, rq, rv):
    """The Newton correction (dq, dv) = -J^-1 (rq, rv), cluster by cluster."""
    n = rq.shape[0]
    dq = np.zeros((n, 3))
    dv = np.zeros((n, 3))
    for c in range(offsets.shape[0] - 1):
        nc = offsets[c + 1] - offsets[c]
        n3 = 3 * nc
        rhs = np.empty(2 * n3)
        for x in range(n3):
            k = members[offsets[c] + x // 3]
            rhs[x] = rq[k, x % 3]
            rhs[n3 + x] = rv[k, x % 3]
        base = 4 * boff[c]
        for x in range(2 * n3):
            acc = 0.0
            for y in range(2 * n3):
                acc += inv[base + x * 2 * n3 + y] * rhs[y]
            k = members[offsets[c] + (x % n3) // 3]
            if x < n3:
                dq[k, x % 3] = -acc
            else:
                dv[k, (x - n3) % 3] = -acc
    return dq, dv
