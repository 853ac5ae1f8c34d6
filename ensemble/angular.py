"""Angular (three-body) invariants and their radial two-body companions, with analytic derivatives.

For atom k, source species a, b, radial functions n, m and Legendre order l::

    rho[k, a, n]              = sum_{i of a} R_n(d_ki)
    psi[k, (a, b), (n, m), l] = sum_{i of a, j of b, i != j} R_n(d_ki) R_m(d_kj) P_l(cos theta_ikj)

with R_n(r) = exp(-(r - mu_n)^2 / (2 sigma_n^2)) fc(r), fc the smooth cutoff of
:func:`ensemble.invariants.pair_geometry` (1 below r_c - width, smoothstep to 0 at r_c), and
theta_ikj the angle at k between the minimum-image bonds to i and j. ``couplings="diagonal"``
keeps n = m (the issue's psi[k, (a, b), n, l]); ``"all"`` every (n, m) (n <= m when a = b,
where (n, m) and (m, n) give the same sum).

Never the double loop over neighbour pairs: with u = (q_k - q_i) / d_ki and the Cartesian
moment tensors T[a, n, alpha] = sum_{i of a} R_n(d_ki) u_i^alpha over the monomials alpha
of degree p <= l_max (stored once per symmetric index, with multinomial weights w_alpha),

    sum_{i of a, j of b} R_n R_m (u_i . u_j)^p = sum_{|alpha| = p} w_alpha T[a, n, alpha] T[b, m, alpha],

P_l(x) = sum_p c_lp x^p and the i = j terms (a = b) are sum_i R_n R_m (P_l(1) = 1): O(neighbours)
per atom. Derivatives by the chain rule through T (d u / d q_k = (1 - u u^T) / d, and the
homogeneous polynomial g_p(u) = sum_alpha w_alpha X_alpha u^alpha has u . grad g_p = p g_p).

Kernels work on a neighbour list in CSR form built from candidate pairs (k < i): entry e of
atom k has neighbour nb[e] and the geometry of d = q_k - q_nb (minimum image). Derivatives are
taken w.r.t. that d: the derivative w.r.t. q_k of entry e's contribution, minus that w.r.t.
q_nb[e]. Feature order (Q = S * N + n_channels * (l_max + 1)): rho[a * N + n], then
psi[S * N + channel * (l_max + 1) + l], channels (a <= b, n, m) in :meth:`AngularBasis.channels`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import factorial

import numpy as np
from numba import njit

import xarray as xr

from .invariants import (_minimum_image, check_cutoff, neighbour_pairs, orthorhombic_box, pair_geometry,
                         smooth_cutoff, species_index)

__all__ = ["AngularBasis", "AngularArrays", "AngularFrame", "default_angular_basis", "angular_frame",
           "angular_features", "angular_jacobian", "angular_self_gradient",
           "angular_design_scatter", "angular_vjp", "angular_linear_forces", "neighbour_csr", "angular_dataset"]

COUPLINGS = ("diagonal", "all")


@lru_cache(maxsize=None)
def _channel_table(nr: int, couplings: str, n_species: int) -> np.ndarray:
    """The channels of :meth:`AngularBasis.channels`, built once per layout (read-only: the layout
    is asked for per frame)."""
    out = []
    for a in range(n_species):
        for b in range(a, n_species):
            for n in range(nr):
                for m in range(nr):
                    if couplings == "diagonal" and m != n:
                        continue
                    if a == b and m < n:
                        continue
                    out.append((a, b, n, m))
    table = np.array(out, dtype=np.int64).reshape(-1, 4)
    table.flags.writeable = False
    return table


@dataclass(frozen=True)
class AngularBasis:
    """Radial Gaussians (centres ``mu_angstrom``, widths ``sigma_angstrom``) under a smooth cutoff
    (``cutoff_angstrom``, switched off over the last ``cutoff_width_angstrom``), Legendre orders
    0..``l_max``, and which radial pairs (n, m) enter psi (``couplings``)."""

    mu_angstrom: tuple[float, ...]
    sigma_angstrom: tuple[float, ...]
    cutoff_angstrom: float
    cutoff_width_angstrom: float = 1.0
    l_max: int = 4
    couplings: str = "diagonal"

    def __post_init__(self):
        mu, sg = tuple(float(x) for x in self.mu_angstrom), tuple(float(x) for x in self.sigma_angstrom)
        object.__setattr__(self, "mu_angstrom", mu)
        object.__setattr__(self, "sigma_angstrom", sg)
        if len(mu) != len(sg) or not mu:
            raise ValueError(f"angular basis: need as many centres as widths, at least one; got {len(mu)} and {len(sg)}")
        if any(not s > 0 for s in sg) or any(not np.isfinite(m) or m < 0 for m in mu):
            raise ValueError(f"angular basis: widths must be > 0 and centres >= 0 (Å); got {mu}, {sg}")
        if not 0 < self.cutoff_width_angstrom <= self.cutoff_angstrom:
            raise ValueError(f"angular basis: need 0 < cutoff_width_angstrom <= cutoff_angstrom, got "
                             f"{self.cutoff_width_angstrom} and {self.cutoff_angstrom}")
        if not 0 <= int(self.l_max) <= 8 or int(self.l_max) != self.l_max:
            raise ValueError(f"angular basis: l_max must be an integer in 0..8, got {self.l_max}")
        if self.couplings not in COUPLINGS:
            raise ValueError(f"angular basis: couplings must be one of {COUPLINGS}, got {self.couplings!r}")

    @property
    def n_radial(self) -> int:
        return len(self.mu_angstrom)

    def channels(self, n_species: int) -> np.ndarray:
        """(n_channels, 4) int64 rows (a, b, n, m): species pairs a <= b, radial pairs (n, m)."""
        return _channel_table(self.n_radial, self.couplings, n_species).copy()

    def n_features(self, n_species: int) -> int:
        n_channels = len(_channel_table(self.n_radial, self.couplings, n_species))
        return n_species * self.n_radial + n_channels * (self.l_max + 1)

    def feature_labels(self, species: list[str] | tuple[str, ...]) -> list[str]:
        s = list(species)
        out = [f"rho[{s[a]}, R{n}]" for a in range(len(s)) for n in range(self.n_radial)]
        for a, b, n, m in self.channels(len(s)):
            for l in range(self.l_max + 1):
                out.append(f"psi[{s[a]}{s[b]}, R{n}R{m}, l={l}]")
        return out

    def feature_radials(self, n_species: int) -> list[tuple[int, ...]]:
        """The radial functions each feature depends on (for backward elimination by radial function)."""
        out = [(n,) for _ in range(n_species) for n in range(self.n_radial)]
        for a, b, n, m in self.channels(n_species):
            out += [tuple(sorted({int(n), int(m)}))] * (self.l_max + 1)
        return out

    def subset(self, keep) -> "AngularBasis":
        keep = sorted(keep)
        return AngularBasis(tuple(self.mu_angstrom[i] for i in keep), tuple(self.sigma_angstrom[i] for i in keep),
                            self.cutoff_angstrom, self.cutoff_width_angstrom, self.l_max, self.couplings)

    def labels(self) -> list[str]:
        return [f"R(mu={m:g}, sigma={s:g})" for m, s in zip(self.mu_angstrom, self.sigma_angstrom)]

    def arrays(self, n_species: int) -> "AngularArrays":
        return AngularArrays.of(self, n_species)

    def to_json(self) -> dict:
        return {"radial": "gaussian exp(-(r - mu)^2 / (2 sigma^2)) * fc(r)", "mu_angstrom": list(self.mu_angstrom),
                "sigma_angstrom": list(self.sigma_angstrom), "cutoff_angstrom": self.cutoff_angstrom,
                "cutoff_width_angstrom": self.cutoff_width_angstrom, "l_max": int(self.l_max),
                "couplings": self.couplings}

    @classmethod
    def from_json(cls, d: dict) -> "AngularBasis":
        try:
            return cls(tuple(d["mu_angstrom"]), tuple(d["sigma_angstrom"]), float(d["cutoff_angstrom"]),
                       float(d.get("cutoff_width_angstrom", 1.0)), int(d.get("l_max", 4)),
                       str(d.get("couplings", "diagonal")))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"angular basis must be {{mu_angstrom: [...], sigma_angstrom: [...], cutoff_angstrom: x, "
                             f"...}}: {exc!r}") from None


def default_angular_basis(cutoff_angstrom: float = 4.5) -> AngularBasis:
    """The default basis, chosen by measurement (README, "Many-body model"): five Gaussians at
    1.0, 1.6, 2.2, 2.9 and 3.7 Å (widths 0.35-0.5 Å: the O-H bond at ~1 Å, the intramolecular
    H...H and hydrogen bond O...H at 1.5-1.9 Å, the 1.6-3 Å hydrogen-bond shell with O...O at
    ~2.8 Å, and the second shell), every radial pair (n, m) coupled, Legendre orders l <= 3,
    cutoff 4.5 Å. On the public DFT water set (64 H2O, held-out configurations) it reaches 5.9 %
    relative force error in the conservative model; l <= 4 gains 0.1 % at ~1.5x the MD cost, the
    diagonal coupling (n = m only) loses 3 %."""
    mu = (1.0, 1.6, 2.2, 2.9, 3.7)
    sigma = (0.35, 0.35, 0.4, 0.45, 0.5)
    return AngularBasis(mu, sigma, cutoff_angstrom, 1.0, 3, "all")


@dataclass(frozen=True)
class AngularArrays:
    """Kernel arguments of a basis for ``n_species`` species (arrays only, built once)."""

    mu: np.ndarray            # (N,) Å
    sigma: np.ndarray         # (N,) Å
    cutoff: float
    width: float
    l_max: int
    mono: np.ndarray          # (n_mono, 3) int64 exponents, ordered by degree p
    mono_p: np.ndarray        # (n_mono,) int64 degree
    mono_w: np.ndarray        # (n_mono,) multinomial weight p! / (a! b! c!)
    leg: np.ndarray           # (l_max + 1, l_max + 1): P_l(x) = sum_p leg[l, p] x^p
    channels: np.ndarray      # (n_channels, 4) int64 (a, b, n, m)
    n_species: int

    @classmethod
    def of(cls, basis: AngularBasis, n_species: int) -> "AngularArrays":
        from numpy.polynomial import legendre

        mono, mono_p, mono_w = [], [], []
        for p in range(basis.l_max + 1):
            for a in range(p, -1, -1):
                for b in range(p - a, -1, -1):
                    c = p - a - b
                    mono.append((a, b, c))
                    mono_p.append(p)
                    mono_w.append(factorial(p) / (factorial(a) * factorial(b) * factorial(c)))
        lm = basis.l_max
        leg = np.zeros((lm + 1, lm + 1))
        for l in range(lm + 1):
            c = legendre.leg2poly([0.0] * l + [1.0])
            leg[l, :len(c)] = c
        return cls(np.asarray(basis.mu_angstrom, float), np.asarray(basis.sigma_angstrom, float),
                   float(basis.cutoff_angstrom), float(basis.cutoff_width_angstrom), int(lm),
                   np.array(mono, dtype=np.int64), np.array(mono_p, dtype=np.int64), np.array(mono_w, float), leg,
                   basis.channels(n_species), int(n_species))

    @property
    def n_features(self) -> int:
        return self.n_species * self.mu.shape[0] + self.channels.shape[0] * (self.l_max + 1)

    def args(self):
        """Positional kernel arguments after (pos, box, species)."""
        return (self.n_species, self.mu, self.sigma, self.cutoff, self.width, self.l_max, self.mono, self.mono_p,
                self.mono_w, self.leg, self.channels)


# --------------------------------------------------------------------------- kernels
#: candidate pairs up to which :func:`neighbour_csr` computes each pair's geometry once and writes it
#: to both of its entries; beyond, the geometry arrays no longer stay in cache and the mirror writes
#: miss it, so each entry computes its own. Measured per pair against per entry: 384 atoms 0.20
#: against 0.55 ms called alone, 0.5 against 0.65-0.7 ms inside the Gram reduction; 3072 atoms 2.5
#: against 4.7 ms called alone, but 8.3 against 5.3 ms inside MD steps, whose force kernels evict
#: the arrays between calls.
PAIR_GEOMETRY_MAX = 1 << 15


@njit(cache=True, inline="always")
def _put_geometry(geo, e, dx, dy, dz, r, fc, dfc):
    """Row e of a geometry array: d (3), |d|, fc, dfc/dr."""
    geo[e, 0] = dx
    geo[e, 1] = dy
    geo[e, 2] = dz
    geo[e, 3] = r
    geo[e, 4] = fc
    geo[e, 5] = dfc


@njit(cache=True)
def neighbour_csr(pairs, pos, box, cutoff, width, n, pair_geometry_max=PAIR_GEOMETRY_MAX):
    """Both directions of the candidate pairs (k < i) closer than ``cutoff`` (all of them when
    ``cutoff`` <= 0), grouped by atom (each
    atom's neighbours ascending when the pairs are sorted by k, then i).

    Returns start (n + 1,), nb (E,), geo (E, 6): d = q_k - q_nb (3), |d|, fc(|d|), dfc/dr. Up to
    ``pair_geometry_max`` candidates, each kept pair's geometry is computed once (the mirror's d
    is -d bitwise: the minimum image is odd); above, entry by entry in storage order (on large
    systems the mirror's write misses the cache). Both give the same bits."""
    c2 = cutoff * cutoff
    m = pairs.shape[0]
    per_pair = m <= pair_geometry_max
    cnt = np.zeros(n + 1, np.int64)
    keep = np.zeros(m, np.bool_)
    pg = np.empty((m if per_pair else 0, 6))
    for q in range(m):
        k = pairs[q, 0]
        i = pairs[q, 1]
        dx, dy, dz = _minimum_image(k, i, pos, box)
        r2 = dx * dx + dy * dy + dz * dz
        if cutoff <= 0.0 or r2 < c2:      # cutoff <= 0: paper mode, every pair
            keep[q] = True
            cnt[k + 1] += 1
            cnt[i + 1] += 1
            if per_pair:              # as pair_geometry, from the same d
                r = np.sqrt(r2)
                fc, dfc = smooth_cutoff(r, cutoff, width) if cutoff <= 0.0 or r < cutoff else (0.0, 0.0)
                _put_geometry(pg, q, dx, dy, dz, r, fc, dfc)
    for k in range(n):
        cnt[k + 1] += cnt[k]
    start = cnt.copy()
    fill = cnt[:n].copy()
    nb = np.empty(start[n], np.int64)
    geo = np.empty((start[n], 6))
    for q in range(m):
        if keep[q]:
            k = pairs[q, 0]
            i = pairs[q, 1]
            e = fill[k]
            f = fill[i]
            nb[e] = i
            fill[k] += 1
            nb[f] = k
            fill[i] += 1
            if per_pair:
                for c in range(3):
                    geo[e, c] = pg[q, c]
                    geo[f, c] = -pg[q, c]
                for c in range(3, 6):
                    geo[e, c] = pg[q, c]
                    geo[f, c] = pg[q, c]
    if not per_pair:
        for k in range(n):
            for e in range(start[k], start[k + 1]):
                _, dx, dy, dz, r, fc, dfc = pair_geometry(k, nb[e], pos, box, cutoff, width)
                _put_geometry(geo, e, dx, dy, dz, r, fc, dfc)
    return start, nb, geo


@njit(cache=True)
def csr_within(start, nb, geo, cutoff, width):
    """The entries of a CSR list (:func:`neighbour_csr`) closer than ``cutoff`` (> 0), with the switch
    of ``cutoff`` and ``width``: what :func:`neighbour_csr` gives for the same candidate pairs, without
    their geometry again (the same entries, order and values)."""
    n = start.shape[0] - 1
    c2 = cutoff * cutoff
    out_start = np.zeros(n + 1, np.int64)
    keep = np.empty(start[n], np.bool_)
    for e in range(start[n]):
        keep[e] = geo[e, 0] * geo[e, 0] + geo[e, 1] * geo[e, 1] + geo[e, 2] * geo[e, 2] < c2
    for k in range(n):
        m = 0
        for e in range(start[k], start[k + 1]):
            m += keep[e]
        out_start[k + 1] = out_start[k] + m
    out_nb = np.empty(out_start[n], np.int64)
    out_geo = np.empty((out_start[n], 6))
    f = 0
    for e in range(start[n]):
        if keep[e]:
            out_nb[f] = nb[e]
            r = geo[e, 3]
            fc, dfc = smooth_cutoff(r, cutoff, width)
            _put_geometry(out_geo, f, geo[e, 0], geo[e, 1], geo[e, 2], r, fc, dfc)
            f += 1
    return out_start, out_nb, out_geo


_FAST = {"reassoc", "contract"}       # let LLVM vectorise the dot products over monomials


@njit(cache=True, fastmath=_FAST, inline="always")
def _radial(mu, sigma, r, fc, dfc, rad, j):
    """rad[j, 0, n] = R_n(r) and rad[j, 1, n] = dR_n/dr (Gaussians times the switch fc, dfc).

    The per-entry helpers here index the caller's arrays rather than take a row view per entry, and
    the helpers are called from the entry loops, not nested in one another: measured on a 128 H2O
    frame, views and nested inlined helpers per entry cost 10-15 % of angular_features and
    angular_linear_forces."""
    for n in range(mu.shape[0]):
        x = (r - mu[n]) / sigma[n]
        g = np.exp(-0.5 * x * x)
        rad[j, 0, n] = g * fc
        rad[j, 1, n] = g * (dfc - x / sigma[n] * fc)


@njit(cache=True, fastmath=_FAST, inline="always")
def _powers(u0, u1, u2, l_max, pw):
    """pw[c, e + 1] = u_c^e for e = 0..l_max."""
    pw[0, 1] = 1.0
    pw[1, 1] = 1.0
    pw[2, 1] = 1.0
    for e in range(2, l_max + 2):
        pw[0, e] = pw[0, e - 1] * u0
        pw[1, e] = pw[1, e - 1] * u1
        pw[2, e] = pw[2, e - 1] * u2


@njit(cache=True, fastmath=_FAST, inline="always")
def _monomial_values(u0, u1, u2, l_max, mono, pw, um, j):
    """um[j, alpha] = u^alpha (``pw`` (3, l_max + 2) scratch for the powers, :func:`_powers`); called
    from the entry loops themselves, not from inside another inlined helper (nested, it cost ~15 %,
    measured)."""
    _powers(u0, u1, u2, l_max, pw)
    for t in range(mono.shape[0]):
        um[j, t] = pw[0, mono[t, 0] + 1] * pw[1, mono[t, 1] + 1] * pw[2, mono[t, 2] + 1]


@njit(cache=True)
def shift_tables(mono, l_max):
    """For the monomials beta of degree < l_max (the first ones, monomials being stored by degree):
    up[c, beta] = index of beta + e_c and cf[c, beta] = its exponent of u_c (beta_c + 1), so that
    d/du_c sum_alpha W_alpha u^alpha = sum_beta cf[c, beta] W[up[c, beta]] u^beta (the first rows
    of :func:`gradient_moment_tables`' ``up``)."""
    n_low = l_max * (l_max + 1) * (l_max + 2) // 6
    up_all, _, _, _ = gradient_moment_tables(mono, l_max)
    up = np.ascontiguousarray(up_all[:, :n_low])
    cf = np.zeros((3, n_low))
    for t in range(n_low):
        for c in range(3):
            cf[c, t] = mono[t, c] + 1.0
    return up, cf


@njit(cache=True, fastmath=_FAST, inline="always")
def _add_moments(rad, j, um, ju, tk, dgk, a):
    """An entry's radial values rad[j, 0] and monomials um[ju] added to the centre's moments of the
    neighbour's species a: T[a, n, alpha] += R_n u^alpha, Dg[a, n, m] += R_n R_m."""
    nr = rad.shape[2]
    nm = um.shape[1]
    for nn in range(nr):
        rn = rad[j, 0, nn]
        for tt in range(nm):
            tk[a, nn, tt] += rn * um[ju, tt]
        for mm in range(nr):
            dgk[a, nn, mm] += rn * rad[j, 0, mm]


@njit(cache=True, fastmath=_FAST, inline="always")
def _centre_features(tk, dgk, n_species, l_max, mono_p, mono_w, leg, channels, s_p, xk):
    """One centre's features (Q,) from its moments T (S, N_r, n_mono) and diagonal sums Dg; ``s_p``
    scratch of l_max + 1 + n_mono values."""
    nr = tk.shape[1]
    nl = l_max + 1
    prod = s_p[nl:]
    for a in range(n_species):
        for nn in range(nr):
            xk[a * nr + nn] = tk[a, nn, 0]
    for c in range(channels.shape[0]):
        a = channels[c, 0]
        b = channels[c, 1]
        nn = channels[c, 2]
        mm = channels[c, 3]
        ta = tk[a, nn]
        tb = tk[b, mm]
        for tt in range(ta.shape[0]):   # all degrees in one vectorised pass, then summed per degree
            prod[tt] = mono_w[tt] * ta[tt] * tb[tt]
        t0 = 0
        for p in range(nl):             # monomials are stored by degree: (p + 1)(p + 2) / 2 of degree p
            t1 = t0 + (p + 1) * (p + 2) // 2
            v = 0.0
            for tt in range(t0, t1):
                v += prod[tt]
            s_p[p] = v
            t0 = t1
        diag = dgk[a, nn, mm] if a == b else 0.0
        base = n_species * nr + c * nl
        for l in range(nl):
            v = 0.0
            for p in range(l + 1):
                v += leg[l, p] * s_p[p]
            xk[base + l] = v - diag


@njit(cache=True, fastmath=_FAST)
def angular_features(start, nb, geo, species, values, n_species, mu, sigma, cutoff, width, l_max, mono, mono_p, mono_w,
                     leg, channels):
    """Features x (N, Q), the moment tensors T (N, S, N_r, n_mono), the diagonal sums
    Dg (N, S, N_r, N_r) = sum_{i of a} R_n R_m and the radial values of every entry (E, 2, N_r):
    R_n and dR_n/dr (reused by the derivative kernels), from a neighbour list in CSR form.
    ``values=False``: x is (N, 0), the features' values not formed (what linear design columns
    need is T and the radial values)."""
    n = start.shape[0] - 1
    nr = mu.shape[0]
    nm = mono.shape[0]
    nl = l_max + 1
    q = n_species * nr + channels.shape[0] * nl
    x = np.zeros((n, q if values else 0))
    t_all = np.zeros((n, n_species, nr, nm))
    dg_all = np.zeros((n, n_species, nr, nr))
    rad_all = np.empty((start[n], 2, nr))
    s_p = np.empty(nl + nm)
    # a centre's entries as the vectorised dimension: powers pe[c, a, t] = u_c^a, monomials
    # um[alpha, t], radial values per species ra[a, n, t] (zero for other species), then
    # T[a, n, alpha] and Dg[a, n, m] as dot products over the entries
    most = 1
    for k in range(n):
        most = max(most, start[k + 1] - start[k])
    pe = np.empty((3, l_max + 1, most))
    um = np.empty((nm, most))
    ra = np.empty((n_species, nr, most))
    for k in range(n):
        e0 = start[k]
        ne = start[k + 1] - e0
        tk = t_all[k]
        dgk = dg_all[k]
        ra[:, :, :ne] = 0.0
        for t in range(ne):
            e = e0 + t
            r = geo[e, 3]
            _radial(mu, sigma, r, geo[e, 4], geo[e, 5], rad_all, e)
            a = species[nb[e]]
            for nn in range(nr):
                ra[a, nn, t] = rad_all[e, 0, nn]
            for c in range(3):
                pe[c, 0, t] = 1.0
                if l_max > 0:
                    pe[c, 1, t] = geo[e, c] / r
        for c in range(3):
            for d in range(2, l_max + 1):
                for t in range(ne):
                    pe[c, d, t] = pe[c, d - 1, t] * pe[c, 1, t]
        for tt in range(nm):
            xa = pe[0, mono[tt, 0]]
            xb = pe[1, mono[tt, 1]]
            xc = pe[2, mono[tt, 2]]
            row = um[tt]
            for t in range(ne):
                row[t] = xa[t] * xb[t] * xc[t]
        for a in range(n_species):
            for nn in range(nr):
                w = ra[a, nn]
                for tt in range(nm):
                    row = um[tt]
                    v = 0.0
                    for t in range(ne):
                        v += w[t] * row[t]
                    tk[a, nn, tt] = v
                for mm in range(nr):
                    row = ra[a, mm]
                    v = 0.0
                    for t in range(ne):
                        v += w[t] * row[t]
                    dgk[a, nn, mm] = v
        if values:
            _centre_features(tk, dgk, n_species, l_max, mono_p, mono_w, leg, channels, s_p, x[k])
    return x, t_all, dg_all, rad_all


@njit(cache=True)
def _contraction_scratch(start, n_species, nr, l_max, nm):
    """Work arrays of :func:`_centre_contractions` for the centres of a CSR list (allocated once per
    kernel call): tkt, pe, cf, gg, uu, g1, g2."""
    nl = l_max + 1
    sb = n_species * nr
    most = 1
    for k in range(start.shape[0] - 1):
        most = max(most, start[k + 1] - start[k])
    return (np.empty((nm, sb)), np.empty((3, max(l_max + 2, 3), most)), np.empty((nm, 4 * most)),
            np.empty((nl, sb, 4 * most)), np.empty((most, 4)), np.empty((most, sb * 3 * nl)),
            np.empty((most, sb * 3 * nl)))


@njit(cache=True)
def _transpose_moments(tk, tkt):
    """tkt[alpha, b * N_r + n] = tk[b, n, alpha]: a centre's moments monomial-major, so that the
    per-entry contractions run over the (species, radial) pairs in contiguous memory."""
    nr = tk.shape[1]
    for b in range(tk.shape[0]):
        for nn in range(nr):
            for tt in range(tk.shape[2]):
                tkt[tt, b * nr + nn] = tk[b, nn, tt]


@njit(cache=True, fastmath=_FAST)
def _centre_contractions(e0, e1, tkt, geo, n_species, nr, l_max, mono, mono_p, mono_w, pe, cf, gg, uu, g1, g2):
    """The per-entry factors every angular derivative of a centre's features is made of, for the
    centre's entries e0 .. e1 - 1 (d = q_k - q_nb[e], ``tkt`` = k's moments from
    :func:`_transpose_moments`), per (species b, radial m) of the moment contracted with and monomial
    degree p: with g_p = sum_{|alpha|=p} w_alpha T[b, m, alpha] u^alpha, g1 = u g_p and
    g2 = (grad_u g_p - p g_p u) / r. Their Legendre transform over p (:func:`_legendre_rows`) gives,
    per order l, the g1, g2 such that the derivative of channel (a, b, n, m), order l, w.r.t. d
    through the entry's own term of T[a, n] is R_n' g1 + R_n g2.

    The entries are the inner (vectorised) dimension of the moment contraction, packed per centre:
    cf[alpha, q E + t] holds the weighted monomials (q = 0) and their gradients (q = 1..3) of entry
    t, built from the powers pe[c, a + 1, t] = u_c^a of all entries (pe[c, 0] = 0, so the derivative
    a u^(a - 1) needs no branch), gg[p, (b, m), q E + t] the contractions per degree, each row built
    while it stays in cache (one saxpy of length 4 E per monomial of that degree; monomials are
    stored by degree). Writes
    uu (E, 4) = (u, r) and g1, g2 (E, S N_r x 3 (l_max + 1)), index (b N_r + m) 3 (l_max + 1) + 3 p +
    xyz, row by row of gg."""
    nm = mono.shape[0]
    nl = l_max + 1
    sb = n_species * nr
    ne = e1 - e0
    for t in range(ne):
        e = e0 + t
        r = geo[e, 3]
        uu[t, 3] = r
        for c in range(3):
            u = geo[e, c] / r
            uu[t, c] = u
            pe[c, 0, t] = 0.0
            pe[c, 1, t] = 1.0
            pe[c, 2, t] = u
    for c in range(3):
        for a in range(3, l_max + 2):
            for t in range(ne):
                pe[c, a, t] = pe[c, a - 1, t] * pe[c, 2, t]
    for tt in range(nm):                     # entries contiguous: vectorised over t
        a = mono[tt, 0]
        b = mono[tt, 1]
        c = mono[tt, 2]
        w = mono_w[tt]
        xa = pe[0, a + 1]
        xb = pe[1, b + 1]
        xc = pe[2, c + 1]
        da = pe[0, a]
        db = pe[1, b]
        dc = pe[2, c]
        row = cf[tt]
        for t in range(ne):
            bc = xb[t] * xc[t]
            row[t] = w * xa[t] * bc
            row[ne + t] = (w * a) * da[t] * bc
            row[2 * ne + t] = (w * b) * xa[t] * db[t] * xc[t]
            row[3 * ne + t] = (w * c) * xa[t] * xb[t] * dc[t]
    w4 = 4 * ne
    for p in range(nl):
        t0 = p * (p + 1) * (p + 2) // 6
        t1 = (p + 1) * (p + 2) * (p + 3) // 6
        for bm in range(sb):
            row = gg[p, bm]
            v = tkt[t0, bm]
            c = cf[t0]
            for t in range(w4):
                row[t] = v * c[t]
            for tt in range(t0 + 1, t1):
                v = tkt[tt, bm]
                c = cf[tt]
                for t in range(w4):
                    row[t] += v * c[t]
    for bm in range(sb):
        for p in range(nl):
            row = gg[p, bm]
            j = bm * 3 * nl + 3 * p
            for t in range(ne):
                u0 = uu[t, 0]
                u1 = uu[t, 1]
                u2 = uu[t, 2]
                inv_r = 1.0 / uu[t, 3]
                gp = row[t]
                pg = p * gp
                g1[t, j] = u0 * gp
                g1[t, j + 1] = u1 * gp
                g1[t, j + 2] = u2 * gp
                g2[t, j] = (row[ne + t] - pg * u0) * inv_r
                g2[t, j + 1] = (row[2 * ne + t] - pg * u1) * inv_r
                g2[t, j + 2] = (row[3 * ne + t] - pg * u2) * inv_r


@njit(cache=True, fastmath=_FAST)
def _entry_jacobian(t, e, si, uu, g1, g2, rad_all, n_species, l_max, channels, je):
    """Write the Jacobian of atom k's features w.r.t. d = q_k - q_nb[e] of its entry e (the t-th of
    its centre, neighbour of species ``si``; uu from :func:`_centre_contractions`, g1 and g2 from it
    per Legendre order, :func:`_legendre_rows`) into je
    (3, Q): rho[si] and every channel with si among its species (:func:`relevant_features`). Other
    columns of je are left as they are (their derivative is zero)."""
    nr = rad_all.shape[2]
    nl = l_max + 1
    nch = channels.shape[0]
    w3 = 3 * nl
    rad = rad_all[e, 0]
    drad = rad_all[e, 1]
    u0 = uu[t, 0]
    u1 = uu[t, 1]
    u2 = uu[t, 2]
    # rho
    for nn in range(nr):
        f = si * nr + nn
        je[0, f] = drad[nn] * u0
        je[1, f] = drad[nn] * u1
        je[2, f] = drad[nn] * u2
    for c in range(nch):
        a = channels[c, 0]
        b = channels[c, 1]
        if a != si and b != si:
            continue
        nn = channels[c, 2]
        mm = channels[c, 3]
        dd = 0.0
        if a == b:          # i = j terms removed: d(R_n R_m)/dr
            dd = drad[nn] * rad[mm] + rad[nn] * drad[mm]
        base = n_species * nr + c * nl
        # side 0: T[a, n] moves (if a == si), contracted with T[b, m]; side 1: T[b, m] with T[a, n]
        for l in range(nl):
            v0 = -dd * u0
            v1 = -dd * u1
            v2 = -dd * u2
            if a == si:
                ro = rad[nn]
                dro = drad[nn]
                j = (b * nr + mm) * w3 + 3 * l
                v0 += dro * g1[t, j] + ro * g2[t, j]
                v1 += dro * g1[t, j + 1] + ro * g2[t, j + 1]
                v2 += dro * g1[t, j + 2] + ro * g2[t, j + 2]
            if b == si:
                ro = rad[mm]
                dro = drad[mm]
                j = (a * nr + nn) * w3 + 3 * l
                v0 += dro * g1[t, j] + ro * g2[t, j]
                v1 += dro * g1[t, j + 1] + ro * g2[t, j + 1]
                v2 += dro * g1[t, j + 2] + ro * g2[t, j + 2]
            je[0, base + l] = v0
            je[1, base + l] = v1
            je[2, base + l] = v2


@njit(cache=True, fastmath=_FAST)
def angular_jacobian(start, nb, geo, species, t_all, rad_all, n_species, mu, sigma, cutoff, width, l_max, mono, mono_p,
                     mono_w, leg, channels):
    """J (E, Q, 3): derivative of atom k's features w.r.t. d = q_k - q_nb[e] of each CSR entry e of k
    (= d x[k] / d q_k from that neighbour; d x[k] / d q_nb[e] = -J[e]). E x Q x 3 values: the
    design rows and self gradients use the fused kernels below instead, which never store it."""
    n = start.shape[0] - 1
    nr = mu.shape[0]
    q = n_species * nr + channels.shape[0] * (l_max + 1)
    jac = np.zeros((start[n], q, 3))
    tkt, pe, cf, gg, uu, g1, g2 = _contraction_scratch(start, n_species, nr, l_max, mono.shape[0])
    g1l = np.empty_like(g1)                  # g1, g2 per Legendre order
    g2l = np.empty_like(g2)
    je = np.zeros((3, q))
    rel = relevant_features(n_species, nr, l_max, channels)
    for k in range(n):
        _transpose_moments(t_all[k], tkt)
        _centre_contractions(start[k], start[k + 1], tkt, geo, n_species, nr, l_max, mono, mono_p, mono_w, pe, cf,
                             gg, uu, g1, g2)
        _legendre_rows(g1[:start[k + 1] - start[k]], leg, l_max + 1, g1l)
        _legendre_rows(g2[:start[k + 1] - start[k]], leg, l_max + 1, g2l)
        for e in range(start[k], start[k + 1]):
            si = species[nb[e]]
            _entry_jacobian(e - start[k], e, si, uu, g1l, g2l, rad_all, n_species, l_max, channels, je)
            for t in range(rel.shape[1]):
                lo = rel[si, t, 0]
                if lo < 0:
                    break
                for f in range(lo, rel[si, t, 1]):
                    for c in range(3):
                        jac[e, f, c] = je[c, f]
    return jac


@njit(cache=True)
def gradient_moment_tables(mono, l_max):
    """Index tables of :func:`angular_self_gradient` over the monomials beta of degree <= l_max + 1,
    ordered as ``mono`` (by degree, then the exponents of x and y descending, so the first
    mono.shape[0] are ``mono``): up[c, alpha] = index of alpha + e_c and down[c, alpha] = index of
    alpha - e_c (0 where alpha_c = 0) for the monomials alpha of ``mono``; par[beta], axis[beta]
    such that u^beta = u^par[beta] u_axis[beta] (beta > 0)."""
    lm1 = l_max + 1
    n1 = (lm1 + 1) * (lm1 + 2) * (lm1 + 3) // 6
    mono1 = np.zeros((n1, 3), np.int64)
    lut = np.zeros((lm1 + 1, lm1 + 1, lm1 + 1), np.int64)
    t = 0
    for p in range(lm1 + 1):
        for a in range(p, -1, -1):
            for b in range(p - a, -1, -1):
                mono1[t, 0] = a
                mono1[t, 1] = b
                mono1[t, 2] = p - a - b
                lut[a, b, p - a - b] = t
                t += 1
    up = np.zeros((3, mono.shape[0]), np.int64)
    down = np.zeros((3, mono.shape[0]), np.int64)
    e = np.zeros(3, np.int64)
    for t in range(mono.shape[0]):
        for c in range(3):
            e[:] = mono[t]
            e[c] += 1
            up[c, t] = lut[e[0], e[1], e[2]]
            if mono[t, c] > 0:
                e[c] -= 2
                down[c, t] = lut[e[0], e[1], e[2]]
    par = np.zeros(n1, np.int64)
    axis = np.zeros(n1, np.int64)
    for t in range(1, n1):
        c = 0
        while mono1[t, c] == 0:
            c += 1
        e[:] = mono1[t]
        e[c] -= 1
        axis[t] = c
        par[t] = lut[e[0], e[1], e[2]]
    return up, down, par, axis


@njit(cache=True, fastmath=_FAST)
def angular_self_gradient(start, nb, geo, species, t_all, rad_all, n_species, mu, sigma, cutoff, width, l_max, mono,
                          mono_p, mono_w, leg, channels):
    """d x[k] / d q_k (N, Q, 3) with the other atoms fixed (the agent kind's gradient), through
    moments of one degree more rather than entry Jacobians.

    Moving q_k moves every d_j = q_k - q_j by the same amount; with u = d / r, d u^alpha / d d_c =
    (alpha_c u^(alpha - e_c) - p u^alpha u_c) / r (p = |alpha|, Euler's relation), so the gradient
    moments G[a, n, c, alpha] = sum_{j of a} d(R_n(r_j) u_j^alpha) / d d_j,c are
    M1[a, n, alpha + e_c] - p M2[a, n, alpha + e_c] + alpha_c M2[a, n, alpha - e_c] with, over the
    monomials beta of degree <= l_max + 1, M1[a, n, beta] = sum_j R_n'(r_j) u_j^beta and
    M2[a, n, beta] = sum_j R_n(r_j) / r_j u_j^beta: per entry two rows of moments to add, the rest
    once per centre. Then rho[a, n] has gradient M1[a, n, e_c], and channel (a, b, n, m), order l:
    sum_p leg[l, p] (M[p, (b, m), (a, n), c] + M[p, (a, n), (b, m), c]) - [a == b] DD[a, n, m, c]
    with M[p, (b, m), (a, n), c] = sum_{|alpha| = p} w_alpha T[b, m, alpha] G[a, n, c, alpha] and
    DD[a, n, m, c] = sum_j (R_n' R_m + R_n R_m') u_c (the i = j terms). Measured on a 128 H2O frame
    (default basis): 3.3-3.5 ms, against 5.8 ms accumulating G itself per entry."""
    n = start.shape[0] - 1
    nr = mu.shape[0]
    nm = mono.shape[0]
    nl = l_max + 1
    sr = n_species * nr
    w3 = 3 * sr
    q = sr + channels.shape[0] * nl
    up, down, par, axis = gradient_moment_tables(mono, l_max)
    n1 = par.shape[0]
    out = np.zeros((n, q, 3))
    m1 = np.empty((sr, n1))
    m2 = np.empty((sr, n1))
    dd = np.empty((sr, nr, 3))
    um = np.empty(n1)
    uv = np.empty(3)
    g = np.empty((nm, w3))                  # G[alpha, (a, n) 3 + c]
    tw = np.empty((nm, sr))                 # w_alpha T[(b, m), alpha], monomial-major
    mp = np.empty((nl, sr, w3))             # M[p, (b, m), (a, n) 3 + c]
    ml = np.empty((nl, sr, w3))             # the same per Legendre order l
    for k in range(n):
        m1[:, :] = 0.0
        m2[:, :] = 0.0
        dd[:, :, :] = 0.0
        for e in range(start[k], start[k + 1]):
            a = species[nb[e]]
            r = geo[e, 3]
            uv[0] = geo[e, 0] / r
            uv[1] = geo[e, 1] / r
            uv[2] = geo[e, 2] / r
            inv_r = 1.0 / r
            um[0] = 1.0
            for t in range(1, n1):
                um[t] = um[par[t]] * uv[axis[t]]
            for nn in range(nr):
                ro = rad_all[e, 0, nn]
                dro = rad_all[e, 1, nn]
                wr = ro * inv_r
                an = a * nr + nn
                r1 = m1[an]
                r2 = m2[an]
                for t in range(n1):
                    r1[t] += dro * um[t]
                    r2[t] += wr * um[t]
                for mm in range(nr):
                    w = dro * rad_all[e, 0, mm] + ro * rad_all[e, 1, mm]
                    dd[an, mm, 0] += w * uv[0]
                    dd[an, mm, 1] += w * uv[1]
                    dd[an, mm, 2] += w * uv[2]
        for t in range(nm):
            p = mono_p[t]
            for an in range(sr):
                for c in range(3):
                    g[t, 3 * an + c] = (m1[an, up[c, t]] - p * m2[an, up[c, t]]
                                        + mono[t, c] * m2[an, down[c, t]])
        for b in range(n_species):
            for mm in range(nr):
                for t in range(nm):
                    tw[t, b * nr + mm] = mono_w[t] * t_all[k, b, mm, t]
        mp[:, :, :] = 0.0
        for t in range(nm):
            gt = g[t]
            for bm in range(sr):
                v = tw[t, bm]
                row = mp[mono_p[t], bm]
                for j in range(w3):
                    row[j] += v * gt[j]
        for l in range(nl):
            for bm in range(sr):
                row = ml[l, bm]
                row[:] = 0.0
                for p in range(l + 1):
                    cl = leg[l, p]
                    mr = mp[p, bm]
                    for j in range(w3):
                        row[j] += cl * mr[j]
        for an in range(sr):
            for c in range(3):
                out[k, an, c] = m1[an, 1 + c]            # rho: beta = e_c, the monomials of degree 1
        for ch in range(channels.shape[0]):
            a = channels[ch, 0]
            b = channels[ch, 1]
            an = a * nr + channels[ch, 2]
            bm = b * nr + channels[ch, 3]
            base = sr + ch * nl
            for l in range(nl):
                for c in range(3):
                    v = ml[l, bm, 3 * an + c] + ml[l, an, 3 * bm + c]
                    if a == b:
                        v -= dd[an, channels[ch, 3], c]
                    out[k, base + l, c] = v
    return out


@njit(cache=True, fastmath=_FAST)
def _legendre_rows(xp, leg, nl, out):
    """out[n, (b, m) 3 nl + 3 l + xyz] = sum_p leg[l, p] xp[n, (b, m) 3 nl + 3 p + xyz]: sums taken
    per monomial degree turned into sums per Legendre order."""
    w3 = 3 * nl
    for nn in range(xp.shape[0]):
        for bm in range(xp.shape[1] // w3):
            base = bm * w3
            for l in range(nl):
                for c in range(3):
                    v = 0.0
                    for p in range(l + 1):
                        v += leg[l, p] * xp[nn, base + 3 * p + c]
                    out[nn, base + 3 * l + c] = v


@njit(cache=True, fastmath=_FAST)
def _map_factored(xf, dd, rho, si, n_species, nr, nl, channels, sign, out):
    """Add sign x (the entry-Jacobian sum held in factored form) to out (3, Q): entries whose moving
    atom is a neighbour of species ``si``, summed as xf[n, (b, m) * 3 nl + 3 l + c] = sum R_n' g1 +
    R_n g2 (:func:`_centre_contractions`), dd[n, m, c] = sum (R_n' R_m + R_n R_m') u_c (n <= m) and
    rho[n, c] = sum R_n' u_c. Channel (a, b, n, m), order l: [a == si] xf[n, (b, m), l] +
    [b == si] xf[m, (a, n), l] - [a == b == si] dd[n, m]; rho[si, n]: rho[n]."""
    sb = n_species * nr
    w3 = 3 * nl
    for nn in range(nr):
        for c in range(3):
            out[c, si * nr + nn] += sign * rho[nn, c]
    for ch in range(channels.shape[0]):
        a = channels[ch, 0]
        b = channels[ch, 1]
        if a != si and b != si:
            continue
        nn = channels[ch, 2]
        mm = channels[ch, 3]
        base = sb + ch * nl
        for l in range(nl):
            for c in range(3):
                v = 0.0
                if a == si:
                    v += xf[nn, (b * nr + mm) * w3 + 3 * l + c]
                if b == si:
                    v += xf[mm, (a * nr + nn) * w3 + 3 * l + c]
                if a == b:
                    v -= dd[min(nn, mm), max(nn, mm), c]
                out[c, base + l] += sign * v


@njit(cache=True, fastmath=_FAST)
def angular_design_scatter(start, nb, geo, species, t_all, rad_all, n_pair, block, rows, colmap, legendre, out,
                           n_species, mu, sigma, cutoff, width, l_max, mono, mono_p, mono_w, leg, channels):
    """Write the angular linear columns of the conservative design into ``out`` (atom i's rows are
    rows[i] .. rows[i] + 2, design column j in column colmap[s_i, j], not written where that is -1):
    entry e of centre k (species s) adds -J[e] to k's rows and +J[e] to its neighbour's, in block s
    after the ``n_pair`` pair features.

    J[e] is never formed. Every channel's entry Jacobian is R_n' g1 + R_n g2 on a moving side
    (:func:`_centre_contractions`), so the entries are summed in factored form, per moving atom and
    centre species: X[n, (b, m), p, xyz] += R_n' g1 + R_n g2 (N_r x S N_r x 3 (l_max + 1) values
    per entry, contiguous, per monomial degree p), the i = j terms and rho beside them; the sums are
    turned into Legendre orders and channel values once per atom (:func:`_legendre_rows`,
    :func:`_map_factored`); ``legendre=False`` leaves them per monomial degree (psi_p columns,
    see :meth:`AngularFrame.add_design_columns`). Entries with the same moving atom as neighbour
    all have its species, the centre's own sums are kept per neighbour species."""
    n = start.shape[0] - 1
    nr = mu.shape[0]
    nl = l_max + 1
    sb = n_species * nr
    w3 = 3 * nl
    wx = sb * w3
    q = sb + channels.shape[0] * nl
    acc_x = np.zeros((n_species, n, nr, wx))       # moved as a neighbour, per species of the centre
    acc_d = np.zeros((n_species, n, nr, nr, 3))
    acc_r = np.zeros((n_species, n, nr, 3))
    own_x = np.empty((n_species, nr, wx))          # moved as the centre, per species of the neighbour
    own_d = np.empty((n_species, nr, nr, 3))
    own_r = np.empty((n_species, nr, 3))
    own_f = np.zeros((n, 3, q))
    xl = np.empty((nr, wx))
    tkt, pe, cf, gg, uu, g1, g2 = _contraction_scratch(start, n_species, nr, l_max, mono.shape[0])
    for k in range(n):
        if start[k] == start[k + 1]:
            continue
        sk = species[k]
        own_x[:, :, :] = 0.0
        own_d[:, :, :, :] = 0.0
        own_r[:, :, :] = 0.0
        _transpose_moments(t_all[k], tkt)
        _centre_contractions(start[k], start[k + 1], tkt, geo, n_species, nr, l_max, mono, mono_p, mono_w, pe, cf,
                             gg, uu, g1, g2)
        for e in range(start[k], start[k + 1]):
            i = nb[e]
            si = species[i]
            t = e - start[k]
            u0 = uu[t, 0]
            u1 = uu[t, 1]
            u2 = uu[t, 2]
            for nn in range(nr):
                ro = rad_all[e, 0, nn]
                dro = rad_all[e, 1, nn]
                for j in range(wx):
                    v = dro * g1[t, j] + ro * g2[t, j]
                    acc_x[sk, i, nn, j] += v
                    own_x[si, nn, j] += v
                acc_r[sk, i, nn, 0] += dro * u0
                acc_r[sk, i, nn, 1] += dro * u1
                acc_r[sk, i, nn, 2] += dro * u2
                own_r[si, nn, 0] += dro * u0
                own_r[si, nn, 1] += dro * u1
                own_r[si, nn, 2] += dro * u2
                for mm in range(nn, nr):                 # symmetric in (n, m): n <= m only
                    w = dro * rad_all[e, 0, mm] + ro * rad_all[e, 1, mm]
                    acc_d[sk, i, nn, mm, 0] += w * u0
                    acc_d[sk, i, nn, mm, 1] += w * u1
                    acc_d[sk, i, nn, mm, 2] += w * u2
                    own_d[si, nn, mm, 0] += w * u0
                    own_d[si, nn, mm, 1] += w * u1
                    own_d[si, nn, mm, 2] += w * u2
        for a in range(n_species):
            if legendre:
                _legendre_rows(own_x[a], leg, nl, xl)
                _map_factored(xl, own_d[a], own_r[a], a, n_species, nr, nl, channels, -1.0, own_f[k])
            else:
                _map_factored(own_x[a], own_d[a], own_r[a], a, n_species, nr, nl, channels, -1.0, own_f[k])
    col = np.zeros((3, q))
    for i in range(n):
        si = species[i]
        for s in range(n_species):
            if s == si:
                col[:, :] = own_f[i]
            else:
                col[:, :] = 0.0
            if legendre:
                _legendre_rows(acc_x[s, i], leg, nl, xl)
                _map_factored(xl, acc_d[s, i], acc_r[s, i], si, n_species, nr, nl, channels, 1.0, col)
            else:
                _map_factored(acc_x[s, i], acc_d[s, i], acc_r[s, i], si, n_species, nr, nl, channels, 1.0, col)
            cm = colmap[si, s * block + n_pair:s * block + n_pair + q]
            for c in range(3):
                r = rows[i] + c
                for f in range(q):
                    if cm[f] >= 0:
                        out[r, cm[f]] = col[c, f]


@njit(cache=True)
def relevant_features(n_species, nr, l_max, channels):
    """(S, R, 2) int64: per neighbour species a, the [start, end) runs of angular features whose
    derivative an entry with a neighbour of a can change (rho[a, :] and every channel with a among
    its two species), padded with (-1, -1)."""
    nl = l_max + 1
    nch = channels.shape[0]
    out = np.full((n_species, 1 + nch, 2), -1, np.int64)
    width = 0
    for a in range(n_species):
        t = 0
        out[a, 0, 0] = a * nr
        out[a, 0, 1] = (a + 1) * nr
        for c in range(nch):
            if channels[c, 0] != a and channels[c, 1] != a:
                continue
            lo = n_species * nr + c * nl
            if out[a, t, 1] == lo:
                out[a, t, 1] = lo + nl
            else:
                t += 1
                out[a, t, 0] = lo
                out[a, t, 1] = lo + nl
        width = max(width, t + 1)
    return out[:, :width].copy()


@njit(cache=True, fastmath=_FAST, inline="always")
def _centre_adjoint(tk, dhk, n_species, l_max, mono_p, mono_w, leg, channels, gadj, wdiag, wp):
    """dE_k / dT[a, n, alpha] (gadj) and dE_k / dDg[a, n, m] (wdiag) of one centre from its moments
    and dh = dE_k / dx_k (Q,)."""
    nr = tk.shape[1]
    nl = l_max + 1
    gadj[:] = 0.0
    wdiag[:] = 0.0
    for a in range(n_species):
        for nn in range(nr):
            gadj[a, nn, 0] += dhk[a * nr + nn]
    for c in range(channels.shape[0]):
        a = channels[c, 0]
        b = channels[c, 1]
        nn = channels[c, 2]
        mm = channels[c, 3]
        base = n_species * nr + c * nl
        tot = 0.0
        for p in range(nl):
            wp[p] = 0.0
        for l in range(nl):
            h = dhk[base + l]
            tot += h
            for p in range(l + 1):
                wp[p] += h * leg[l, p]
        if a == b:
            wdiag[a, nn, mm] -= tot
        ta = tk[a, nn]
        tb = tk[b, mm]
        ga = gadj[a, nn]
        gb = gadj[b, mm]
        for p in range(nl):
            wpp = wp[p]
            for tt in range(p * (p + 1) * (p + 2) // 6, (p + 1) * (p + 2) * (p + 3) // 6):
                w = wpp * mono_w[tt]
                ga[tt] += w * tb[tt]
                gb[tt] += w * ta[tt]


@njit(cache=True, fastmath=_FAST, inline="always")
def _entry_gradient(r, u0, u1, u2, rad, j, um, ju, gadj, wdiag, si, mono_p, up, cf, wr, wd):
    """v = dE_k / dd of one entry (d = q_k - q_nb) from the centre's adjoint restricted to the
    neighbour's species si (gadj[si], wdiag[si]) and the entry's radial values rad[j] and monomials
    um[ju]."""
    nr = rad.shape[2]
    nm = um.shape[1]
    # combine the adjoint over radial functions first: W = sum_n R_n G[n], W' = sum_n R'_n G[n]
    for tt in range(nm):
        wr[tt] = 0.0
        wd[tt] = 0.0
    dw = 0.0
    for nn in range(nr):
        rn = rad[j, 0, nn]
        dn = rad[j, 1, nn]
        for tt in range(nm):
            g = gadj[si, nn, tt]
            wr[tt] += rn * g
            wd[tt] += dn * g
        for mm in range(nr):
            # Dg[a, n, m] = sum R_n R_m is stored for n <= m channels only
            dw += wdiag[si, nn, mm] * (dn * rad[j, 0, mm] + rn * rad[j, 1, mm])
    sg = 0.0
    spg = 0.0
    d0 = 0.0
    d1 = 0.0
    d2 = 0.0
    for tt in range(nm):
        ut = um[ju, tt]
        sg += wd[tt] * ut
        spg += wr[tt] * mono_p[tt] * ut
    for tt in range(up.shape[1]):       # the gradient of sum_alpha W_alpha u^alpha in u
        ut = um[ju, tt]
        d0 += cf[0, tt] * wr[up[0, tt]] * ut
        d1 += cf[1, tt] * wr[up[1, tt]] * ut
        d2 += cf[2, tt] * wr[up[2, tt]] * ut
    radial_u = sg - spg / r + dw        # coefficient of u
    return radial_u * u0 + d0 / r, radial_u * u1 + d1 / r, radial_u * u2 + d2 / r


@njit(cache=True, inline="always")
def _add_entry_force(f_out, k, i, v0, v1, v2, conservative):
    """v = dE_k / dd of an entry (d = q_k - q_i): -v on k; on i +v when the forces are conservative
    (agent: each atom feels only its own loss)."""
    f_out[k, 0] -= v0
    f_out[k, 1] -= v1
    f_out[k, 2] -= v2
    if conservative:
        f_out[i, 0] += v0
        f_out[i, 1] += v1
        f_out[i, 2] += v2


@njit(cache=True, fastmath=_FAST)
def angular_vjp(start, nb, geo, species, t_all, rad_all, dh, conservative, n_species, mu, sigma, cutoff, width, l_max,
                mono, mono_p, mono_w, leg, channels):
    """Forces (N, 3) from dh[k, f] = dE/dx_f[k] (only the angular block, (N, Q)) without the Jacobian.

    Conservative: -sum_k dh[k] . d x[k] / dq on every atom; agent: on atom k only its own features'
    term, -dh[k] . d x[k] / d q_k.
    """
    n = start.shape[0] - 1
    nr = mu.shape[0]
    nm = mono.shape[0]
    f_out = np.zeros((n, 3))
    gadj = np.empty((n_species, nr, nm))     # dE_k / dT[a, n, alpha]
    wdiag = np.empty((n_species, nr, nr))    # dE_k / dDg[a, n, m]
    wp = np.empty(l_max + 1)
    um = np.empty((1, nm))
    up, cf = shift_tables(mono, l_max)
    pw = np.empty((3, l_max + 2))
    wr = np.empty(nm)
    wd = np.empty(nm)
    for k in range(n):
        if start[k] == start[k + 1]:
            continue
        _centre_adjoint(t_all[k], dh[k], n_species, l_max, mono_p, mono_w, leg, channels, gadj, wdiag, wp)
        for e in range(start[k], start[k + 1]):
            si = species[nb[e]]
            r = geo[e, 3]
            u0 = geo[e, 0] / r
            u1 = geo[e, 1] / r
            u2 = geo[e, 2] / r
            _monomial_values(u0, u1, u2, l_max, mono, pw, um, 0)
            v0, v1, v2 = _entry_gradient(r, u0, u1, u2, rad_all, e, um, 0, gadj, wdiag, si, mono_p, up, cf, wr, wd)
            _add_entry_force(f_out, k, nb[e], v0, v1, v2, conservative)
    return f_out


@njit(cache=True)
def linear_angular_tables(dh, n_species, nr, l_max, leg, channels):
    """For an energy linear in the angular features, dh (S, Q) = dE_k / dx_k per centre species:
    W (S, l_max + 1, S * N_r, S * N_r), symmetric, with sum_psi dh . psi = 1/2 sum_alpha w_alpha
    T[:, alpha] . W[p_alpha] T[:, alpha] - sum Dg terms, and wdiag (S, S, N_r, N_r), the
    coefficients of the diagonal sums Dg[a, n, m] (the removed i = j terms)."""
    nl = l_max + 1
    rows = n_species * nr
    w = np.zeros((dh.shape[0], nl, rows, rows))
    wdiag = np.zeros((dh.shape[0], n_species, nr, nr))
    wp = np.empty(nl)
    for s in range(dh.shape[0]):
        for c in range(channels.shape[0]):
            a = channels[c, 0]
            b = channels[c, 1]
            nn = channels[c, 2]
            mm = channels[c, 3]
            i = a * nr + nn
            j = b * nr + mm
            base = n_species * nr + c * nl
            tot = 0.0
            wp[:] = 0.0
            for l in range(nl):
                h = dh[s, base + l]
                tot += h
                for p in range(l + 1):
                    wp[p] += h * leg[l, p]
            for p in range(nl):
                if i == j:
                    w[s, p, i, i] += 2.0 * wp[p]
                else:
                    w[s, p, i, j] += wp[p]
                    w[s, p, j, i] += wp[p]
            if a == b:
                wdiag[s, a, nn, mm] -= tot
    return w, wdiag


@njit(cache=True, fastmath=_FAST)
def angular_linear_forces(start, nb, geo, species, dh, conservative, n_species, mu, sigma, cutoff, width, l_max, mono,
                          mono_p, mono_w, leg, channels):
    """Forces (N, 3) and energy sum_k dh[s_k] . x[k] in one pass per centre, for an energy linear
    in the angular features: dh (S, Q) = dE_k / dx_k for a centre of each species (a constant); the
    same numbers as :func:`angular_features` + :func:`angular_vjp`, without the features.

    The energy is a fixed quadratic form in each centre's moments (:func:`linear_angular_tables`),
    so its adjoint dE_k / dT is one small matrix product per monomial. Each centre's radial values
    and monomials are computed once, kept for its own entries, and used for the moments, then for
    the forces."""
    n = start.shape[0] - 1
    nr = mu.shape[0]
    nm = mono.shape[0]
    rows = n_species * nr
    w_all, wdiag_all = linear_angular_tables(dh, n_species, nr, l_max, leg, channels)
    most = 1
    for k in range(n):
        most = max(most, start[k + 1] - start[k])
    e_rad = np.empty((most, 2, nr))
    e_um = np.empty((most, nm))
    up, cf = shift_tables(mono, l_max)
    f_out = np.zeros((n, 3))
    energy = 0.0
    tk = np.empty((n_species, nr, nm))
    dgk = np.empty((n_species, nr, nr))
    gadj = np.empty((n_species, nr, nm))
    col = np.empty(rows)
    pw = np.empty((3, l_max + 2))
    wr = np.empty(nm)
    wd = np.empty(nm)
    for k in range(n):
        if start[k] == start[k + 1]:
            continue
        tk[:] = 0.0
        dgk[:] = 0.0
        for e in range(start[k], start[k + 1]):
            j = e - start[k]
            r = geo[e, 3]
            _radial(mu, sigma, r, geo[e, 4], geo[e, 5], e_rad, j)
            _monomial_values(geo[e, 0] / r, geo[e, 1] / r, geo[e, 2] / r, l_max, mono, pw, e_um, j)
            _add_moments(e_rad, j, e_um, j, tk, dgk, species[nb[e]])
        sk = species[k]
        dhk = dh[sk]
        wk = w_all[sk]
        wdiag = wdiag_all[sk]
        t2 = tk.reshape(rows, nm)
        g2 = gadj.reshape(rows, nm)
        ek = 0.0
        for t in range(nm):
            for i in range(rows):
                col[i] = t2[i, t]
            wt = wk[mono_p[t]]
            for i in range(rows):
                v = 0.0
                for j2 in range(rows):
                    v += wt[i, j2] * col[j2]
                g2[i, t] = mono_w[t] * v
                ek += col[i] * g2[i, t]
        ek *= 0.5
        for a in range(n_species):
            for nn in range(nr):
                h = dhk[a * nr + nn]
                g2[a * nr + nn, 0] += h
                ek += h * tk[a, nn, 0]
                for mm in range(nr):
                    ek += wdiag[a, nn, mm] * dgk[a, nn, mm]
        energy += ek
        for e in range(start[k], start[k + 1]):
            j = e - start[k]
            si = species[nb[e]]
            r = geo[e, 3]
            v0, v1, v2 = _entry_gradient(r, geo[e, 0] / r, geo[e, 1] / r, geo[e, 2] / r, e_rad, j, e_um, j, gadj, wdiag,
                                         si, mono_p, up, cf, wr, wd)
            _add_entry_force(f_out, k, nb[e], v0, v1, v2, conservative)
    return f_out, energy


# --------------------------------------------------------------------------- frame and dataset wrappers
@dataclass(frozen=True)
class AngularFrame:
    """Angular features of one frame and what their derivatives need: ``x`` (N, Q), the CSR
    neighbour list (``start``, ``nb``, ``geo``), the moments ``t``, the entries' radial values
    ``rad`` (E, 2, N_r), the species codes and the basis arrays."""

    x: np.ndarray
    start: np.ndarray
    nb: np.ndarray
    geo: np.ndarray
    t: np.ndarray
    rad: np.ndarray
    codes: np.ndarray
    arr: "AngularArrays"

    def vjp(self, dh: np.ndarray, conservative: bool) -> np.ndarray:
        """Forces (N, 3) from dh = dE/dx (N, Q): see :func:`angular_vjp`."""
        return angular_vjp(self.start, self.nb, self.geo, self.codes, self.t, self.rad, np.ascontiguousarray(dh),
                           conservative, *self.arr.args())

    def jacobian(self) -> np.ndarray:
        """J (E, Q, 3) of every entry (:func:`angular_jacobian`; E x Q x 3 values, for tests and the
        generic scatter kernel)."""
        return angular_jacobian(self.start, self.nb, self.geo, self.codes, self.t, self.rad, *self.arr.args())

    def self_gradient(self) -> np.ndarray:
        """d x[k] / d q_k (N, Q, 3) with all other atoms fixed (the agent kind's gradient)."""
        return angular_self_gradient(self.start, self.nb, self.geo, self.codes, self.t, self.rad, *self.arr.args())

    def add_design_columns(self, n_pair: int, block: int, out: np.ndarray, rows: np.ndarray | None = None,
                           legendre: bool = True, colmap: np.ndarray | None = None) -> np.ndarray:
        """Write the angular linear columns of the conservative design into ``out``
        (:func:`angular_design_scatter`; atom i's rows start at rows[i], default 3 i). With
        ``legendre=False`` the psi columns are those of the monomial degrees p instead of the
        Legendre orders l: psi_p = sum_{i != j} R_n R_m (u_i . u_j)^p, of which psi_l = sum_p
        leg[l, p] psi_p (a fixed change of columns, :func:`ensemble.fit.design.legendre_gram`).
        ``colmap`` (S, S * block): design column j of an atom of species s goes to column colmap[s, j],
        not written where -1 (default: column j)."""
        n, q = self.t.shape[0], self.arr.n_features
        n_s = self.arr.n_species
        rows = 3 * np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        if colmap is None:
            colmap = np.tile(np.arange(n_s * block, dtype=np.int64), (n_s, 1))
        colmap = np.ascontiguousarray(colmap, dtype=np.int64)
        if (n_pair + q > block or out.ndim != 2 or colmap.shape != (n_s, n_s * block)
                or colmap.max() >= out.shape[1] or rows.shape != (n,)
                or (n and (rows.min() < 0 or rows.max() + 3 > out.shape[0]))):
            raise ValueError(f"design rows of shape {out.shape} (column map {colmap.shape}) cannot hold {n_s} blocks "
                             f"of {block} columns with {q} angular features after {n_pair} pair features for {n} atoms")
        angular_design_scatter(self.start, self.nb, self.geo, self.codes, self.t, self.rad, n_pair, block, rows,
                               colmap, legendre, out, *self.arr.args())
        return out


def angular_frame(pos: np.ndarray, box: np.ndarray, codes: np.ndarray, arr: AngularArrays,
                  pairs: np.ndarray | None = None, values: bool = True, csr: tuple | None = None) -> AngularFrame:
    """Angular features of one frame (positions (N, 3) Å, orthorhombic box (3,) Å, species codes (N,)).

    ``pairs``: candidate pairs (k < i) that include every pair within the cutoff (default: cell lists).
    ``csr``: instead, a CSR list (start, nb, geo) of :func:`neighbour_csr` that reaches at least the
    cutoff, whose nearer entries are taken (:func:`csr_within`).
    ``values=False``: the frame's ``x`` is (N, 0), for users of the linear design columns only.
    """
    pos = np.ascontiguousarray(pos, dtype=float)
    box = np.asarray(box, dtype=float)
    if csr is not None:
        start, nb, geo = csr_within(*csr, arr.cutoff, arr.width)
    else:
        if pairs is None:
            pairs = neighbour_pairs(pos, box, arr.cutoff)
        start, nb, geo = neighbour_csr(pairs, pos, box, arr.cutoff, arr.width, pos.shape[0])
    codes = np.ascontiguousarray(codes)
    x, t, _, rad = angular_features(start, nb, geo, codes, values, *arr.args())
    return AngularFrame(x, start, nb, geo, t, rad, codes, arr)


def angular_dataset(ds: xr.Dataset, basis: AngularBasis, *, species_order: list[str] | None = None) -> xr.Dataset:
    """Lazy angular features of a trajectory: ``psi`` (frame, atom, angular_feature), per frame chunk
    with dask (rho first, then psi; labels in the ``angular_feature`` coordinate)."""
    codes, order = species_index(ds["species"].values, species_order)
    arr = basis.arrays(len(order))
    cell = ds["cell"]
    check_cutoff(basis.cutoff_angstrom, basis.cutoff_width_angstrom, orthorhombic_box(cell.values))
    if "frame" in cell.dims:
        box = xr.apply_ufunc(lambda c: orthorhombic_box(c), cell, input_core_dims=[["cell_vector", "xyz"]],
                             output_core_dims=[["xyz"]], dask="parallelized", output_dtypes=[float])
    else:
        box = xr.DataArray(orthorhombic_box(cell.values), dims=("xyz",)).expand_dims(frame=ds.sizes["frame"])
        box = box.chunk({"frame": ds["positions"].chunks[0]} if ds["positions"].chunks else {})

    def kernel(pos, bx):
        out = np.empty(pos.shape[:-2] + (pos.shape[-2], arr.n_features))
        flat_p = pos.reshape(-1, pos.shape[-2], 3)
        flat_b = bx.reshape(-1, 3)
        flat_o = out.reshape(-1, pos.shape[-2], arr.n_features)
        for f in range(flat_p.shape[0]):
            flat_o[f] = angular_frame(flat_p[f], flat_b[f], codes, arr).x
        return out

    psi = xr.apply_ufunc(kernel, ds["positions"], box, input_core_dims=[["atom", "xyz"], ["xyz"]],
                         output_core_dims=[["atom", "angular_feature"]], dask="parallelized", output_dtypes=[float],
                         dask_gufunc_kwargs={"output_sizes": {"angular_feature": arr.n_features}})
    out = xr.Dataset({"psi": psi}).assign_coords(
        angular_feature=("angular_feature", np.array(basis.feature_labels(order), dtype=object)))
    out["psi"].attrs = {"units": "1", "long_name": "rho[k,a,n] = sum_i R_n; psi[k,(a,b),(n,m),l] = "
                        "sum_{i != j} R_n(d_ki) R_m(d_kj) P_l(cos theta_ikj)"}
    out.attrs = {"angular_basis": str(basis.to_json())}
    return out
