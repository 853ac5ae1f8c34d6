"""The feature vector of a model: pair invariants, then (optionally) angular invariants.

For atom k the loss H_s(x_k) = A_s . x_k + 1/2 x_k . B_s . x_k is written over

    x_k = [phi[k, a, m] (P = S x M, source-major),  rho / psi of :mod:`ensemble.angular` (Q)]

with F = P + Q features. The fit's quadratic columns are a chosen set of feature pairs (j <= l)
(:meth:`FeatureSpec.quadratic_pairs`): the paper's model is quadratic in all pair invariants and
has no angular block.

:func:`frame_terms` evaluates one frame once: the features, and per neighbour-list entry the
pair terms g_m = (w_m fc)'(r) / r and the angular Jacobian, from which design rows, self
gradients and forces all follow (:func:`feature_forces`). Backward elimination removes
*groups*: a pair weight function (its invariants for every source species) or an angular radial
function (every rho / psi that uses it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numba import njit

from .angular import AngularArrays, AngularBasis, AngularFrame, angular_frame, neighbour_csr
from .invariants import WeightSet, neighbour_pairs, weight_plan, weight_values

__all__ = ["QUADRATIC", "FeatureSpec", "FrameTerms", "frame_terms", "feature_forces", "pair_csr_terms"]

#: which feature pairs get quadratic coefficients
QUADRATIC = ("none", "pair", "pair+radial", "all")


@dataclass(frozen=True)
class FeatureSpec:
    """Layout of the features of ``n_species`` species (see the module docstring)."""

    n_species: int
    weights: WeightSet
    angular: AngularBasis | None = None
    quadratic: str = "pair"
    cutoff_angstrom: float | None = None        # pair invariants; None: paper mode (all minimum-image pairs)
    width_angstrom: float = 1.0
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.quadratic not in QUADRATIC:
            raise ValueError(f"quadratic must be one of {QUADRATIC}, got {self.quadratic!r}")

    @property
    def p(self) -> int:
        """Pair features (S x M)."""
        return self.n_species * len(self.weights)

    @property
    def q(self) -> int:
        """Angular features."""
        return 0 if self.angular is None else self.angular.n_features(self.n_species)

    @property
    def n_features(self) -> int:
        return self.p + self.q

    def quadratic_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(j, l), j <= l, of the quadratic columns, in column order (for "pair": np.triu_indices(P))."""
        key = "quad"
        if key not in self._cache:
            if self.quadratic == "none":
                n = 0
            elif self.quadratic == "pair":
                n = self.p
            elif self.quadratic == "pair+radial":
                n = self.p + (self.n_species * self.angular.n_radial if self.angular is not None else 0)
            else:
                n = self.n_features
            j, l = np.triu_indices(n)
            self._cache[key] = (j.astype(np.int64), l.astype(np.int64))
        return self._cache[key]

    @property
    def n_quadratic(self) -> int:
        return len(self.quadratic_pairs()[0])

    @property
    def block(self) -> int:
        """Columns per species block: F linear + the quadratic pairs."""
        return self.n_features + self.n_quadratic

    def group_names(self) -> list[str]:
        out = [f"pair {lab}" for lab in self.weights.labels]
        if self.angular is not None:
            out += [f"angular {lab}" for lab in self.angular.labels()]
        return out

    def feature_groups(self) -> list[tuple[int, ...]]:
        """The groups (indices into :meth:`group_names`) each feature depends on."""
        m = len(self.weights)
        out = [(w,) for _ in range(self.n_species) for w in range(m)]
        if self.angular is not None:
            out += [tuple(m + r for r in rs) for rs in self.angular.feature_radials(self.n_species)]
        return out

    def two_body_source(self) -> np.ndarray:
        """Source species of the two-body features (phi and rho; -1 for psi): a two-body sum over
        (k of s, i of a) is the same sum as over (i of a, k of s), so in a conservative fit its
        linear column appears in both species blocks."""
        m = len(self.weights)
        src = [a for a in range(self.n_species) for _ in range(m)]
        if self.angular is not None:
            nr = self.angular.n_radial
            src += [a for a in range(self.n_species) for _ in range(nr)]
            src += [-1] * (self.q - self.n_species * nr)
        return np.array(src, dtype=np.int64)

    def neighbour_species(self) -> np.ndarray:
        """(F, S) bool: whether an atom of species s moving as a neighbour of atom k can change x_k[f]
        (phi and rho: their source species; psi (a, b): a and b)."""
        out = np.zeros((self.n_features, self.n_species), dtype=bool)
        src = self.two_body_source()
        two = src >= 0
        out[np.flatnonzero(two), src[two]] = True
        if self.angular is not None:
            first = self.p + self.n_species * self.angular.n_radial
            nl = self.angular.l_max + 1
            for c, (a, b, _, _) in enumerate(self.angular.channels(self.n_species)):
                out[first + c * nl:first + (c + 1) * nl, [a, b]] = True
        return out

    def conservative_twins(self) -> tuple[np.ndarray, np.ndarray]:
        """(twin, original) design columns of the conservative kind that are the same column: the
        linear cross-species two-body terms of block s with source a < s (phi or rho) and those of
        block a with source s, one pair sum counted from either end (:func:`ensemble.fit.gram.joint_columns`
        fits the original only)."""
        src = self.two_body_source()
        m, nr = len(self.weights), (self.angular.n_radial if self.angular is not None else 0)
        twin, orig = [], []
        for s in range(self.n_species):
            for f in np.flatnonzero((src >= 0) & (src < s)):
                a = src[f]
                size = m if f < self.p else nr            # phi groups of M weights, rho groups of N_r radials
                twin.append(s * self.block + f)
                orig.append(a * self.block + f + (s - a) * size)
        return np.array(twin, dtype=np.int64), np.array(orig, dtype=np.int64)

    def conservative_support(self, s: int) -> np.ndarray:
        """Columns (of all S blocks, sorted) of the conservative design that can be nonzero in the rows
        of an atom of species s: all of its own block (its own features move with it), and in block
        b != s the features an atom of s moves as a neighbour (:meth:`neighbour_species`) and the
        quadratic columns with one of those among their two features. The others are zero by
        construction, and the Gram reduction leaves them out of its products."""
        moved = self.neighbour_species()[:, s]
        j, l = self.quadratic_pairs()
        other = np.concatenate([np.flatnonzero(moved), self.n_features + np.flatnonzero(moved[j] | moved[l])])
        cols = [b * self.block + (np.arange(self.block) if b == s else other) for b in range(self.n_species)]
        return np.concatenate(cols).astype(np.int64)

    def columns(self, keep_groups, quadratic: bool = True) -> np.ndarray:
        """Columns of one species block (linear, then quadratic) whose features use only kept groups."""
        keep = set(int(g) for g in keep_groups)
        ok = np.array([set(g) <= keep for g in self.feature_groups()], dtype=bool)
        cols = list(np.flatnonzero(ok))
        if quadratic:
            j, l = self.quadratic_pairs()
            cols += list(self.n_features + np.flatnonzero(ok[j] & ok[l]))
        return np.array(cols, dtype=np.int64)

    def labels(self, species) -> list[str]:
        out = [f"phi[{s}, {w}]" for s in species for w in self.weights.labels]
        if self.angular is not None:
            out += self.angular.feature_labels(species)
        return out

    def adjacency(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per feature f, the quadratic columns it enters and the partner feature whose value
        multiplies d x_f there: (cols (F, D), partners (F, D), counts (F,)), columns counted from
        the start of the quadratic block. d(x_j x_l) = x_l dx_j + x_j dx_l; the diagonal column
        holds 1/2 x_f^2, whose derivative x_f dx_f is listed once."""
        if "adj" not in self._cache:
            j, l = self.quadratic_pairs()
            f = self.n_features
            counts = np.zeros(f, np.int64)
            for a, b in zip(j, l):
                counts[a] += 1
                if b != a:
                    counts[b] += 1
            d = max(int(counts.max()) if f else 0, 1)
            cols = np.zeros((f, d), np.int64)
            partners = np.zeros((f, d), np.int64)
            fill = np.zeros(f, np.int64)
            for q, (a, b) in enumerate(zip(j, l)):
                cols[a, fill[a]] = q
                partners[a, fill[a]] = b
                fill[a] += 1
                if b != a:
                    cols[b, fill[b]] = q
                    partners[b, fill[b]] = a
                    fill[b] += 1
            self._cache["adj"] = (cols, partners, counts)
        return self._cache["adj"]

    def angular_arrays(self) -> AngularArrays | None:
        if self.angular is None:
            return None
        if "ang" not in self._cache:
            self._cache["ang"] = self.angular.arrays(self.n_species)
        return self._cache["ang"]

    def reach_angstrom(self) -> float:
        """Largest interaction distance (<= 0: paper mode pairs, all minimum-image pairs)."""
        if self.cutoff_angstrom is None:
            return -1.0
        return max(self.cutoff_angstrom, self.angular.cutoff_angstrom if self.angular is not None else 0.0)


# --------------------------------------------------------------------------- kernels
@njit(cache=True)
def pair_csr_terms(start, nb, geo, species, n_species, kinds, params):
    """Pair invariants phi (N, S * M) and per CSR entry g (E, M) = (w_m fc)'(r) / r, so that the
    entry's term of phi[k, (s_nb, m)] has derivative g[e, m] * d w.r.t. q_k (d = geo[e, :3]).

    The weights of a pair are evaluated once for both of its entries (:func:`weight_values`):
    entry (k, i), k < i, finds its mirror (i, k) with a cursor per atom (each atom's partners below
    it come first and ascending in the lists of :func:`ensemble.angular.neighbour_csr`); an entry
    without a mirror where expected is evaluated on its own. Every phi[k] still receives its terms
    in the order of k's list. The mirrors' g rows are copied in a second pass, in storage order:
    written from the first pass, each would land in another atom's list (on large systems a cache
    and TLB miss per pair)."""
    n = start.shape[0] - 1
    m_w = kinds.shape[0]
    plan = weight_plan(kinds, params)
    w = np.empty(m_w)
    dw = np.empty(m_w)
    phi = np.zeros((n, n_species * m_w))
    g = np.empty((nb.shape[0], m_w))
    mirror_of = np.full(nb.shape[0], -1, np.int64)      # entry t's g is that of entry mirror_of[t]
    cursor = start[:n].copy()
    for k in range(n):
        base_k = species[k] * m_w
        for e in range(start[k], start[k + 1]):
            i = nb[e]
            if i < k and mirror_of[e] >= 0:
                continue
            base = species[i] * m_w
            t = cursor[i] if i > k else 0
            both = i > k and t < start[i + 1] and nb[t] == k
            fc = geo[e, 4]
            dfc = geo[e, 5]
            ir = weight_values(kinds, plan, geo[e, 3], w, dw)
            for mm in range(m_w):
                phi[k, base + mm] += w[mm] * fc
                g[e, mm] = (dw[mm] * fc + w[mm] * dfc) * ir
            if both:
                cursor[i] = t + 1
                mirror_of[t] = e
                for mm in range(m_w):
                    phi[i, base_k + mm] += w[mm] * fc
    for t in range(nb.shape[0]):
        e = mirror_of[t]
        if e >= 0:
            for mm in range(m_w):
                g[t, mm] = g[e, mm]
    return phi, g


@njit(cache=True)
def pair_self_gradient(start, nb, geo, species, n_species, g):
    """d phi[k] / d q_k (N, S * M, 3) from :func:`pair_csr_terms`."""
    n = start.shape[0] - 1
    m_w = g.shape[1]
    out = np.zeros((n, n_species * m_w, 3))
    for k in range(n):
        for e in range(start[k], start[k + 1]):
            base = species[nb[e]] * m_w
            for mm in range(m_w):
                for c in range(3):
                    out[k, base + mm, c] += g[e, mm] * geo[e, c]
    return out


@njit(cache=True)
def pair_csr_forces(start, nb, geo, species, g, dh, conservative):
    """Forces of the pair block from dh[k, f] = dE/dphi_f[k] (only the pair columns)."""
    n = start.shape[0] - 1
    m_w = g.shape[1]
    out = np.zeros((n, 3))
    for k in range(n):
        for e in range(start[k], start[k + 1]):
            i = nb[e]
            base = species[i] * m_w
            s = 0.0
            for mm in range(m_w):
                s += dh[k, base + mm] * g[e, mm]
            for c in range(3):
                out[k, c] -= s * geo[e, c]
                if conservative:
                    out[i, c] += s * geo[e, c]
    return out


@dataclass(frozen=True)
class FrameTerms:
    """One frame's features ``x`` (N, F; the pair features only, (N, P), when the angular values
    were not asked for) and what derivatives need: the pair CSR list (``start``, ``nb``, ``geo``)
    with ``g`` (E, M), and the angular frame (or None)."""

    x: np.ndarray
    start: np.ndarray
    nb: np.ndarray
    geo: np.ndarray
    g: np.ndarray
    ang: AngularFrame | None

    def self_gradient(self, species: np.ndarray, n_species: int) -> np.ndarray:
        """d x[k] / d q_k (N, F, 3) with all other atoms fixed."""
        pg = pair_self_gradient(self.start, self.nb, self.geo, species, n_species, self.g)
        if self.ang is None:
            return pg
        return np.concatenate([pg, self.ang.self_gradient()], axis=1)


def frame_terms(pos: np.ndarray, box: np.ndarray, codes: np.ndarray, spec: FeatureSpec, *,
                pairs: np.ndarray | None = None, angular_values: bool = True) -> FrameTerms:
    """Features of one frame (positions (N, 3) Å, box (3,) Å, species codes (N,)) and what their
    derivatives need (the angular Jacobian is computed on demand, entry by entry, by its users).

    ``pairs``: candidate pairs (k < i) for the pair and the angular terms alike, containing every pair
    within :meth:`FeatureSpec.reach_angstrom` (default: cell lists; paper mode: all pairs, and the
    angular terms their own list within the angular cutoff). A shorter list gives the features the
    atoms would have if only those pairs existed (the fast part of a split, :mod:`ensemble.md.respa`).
    ``angular_values=False`` skips the angular features' values (x holds the pair features only):
    the linear angular design columns need only the moments and radial values.
    """
    pos = np.ascontiguousarray(pos, dtype=float)
    box = np.asarray(box, dtype=float)
    n = pos.shape[0]
    cutoff = -1.0 if spec.cutoff_angstrom is None else float(spec.cutoff_angstrom)
    given = pairs is not None
    if pairs is None:
        pairs = neighbour_pairs(pos, box, spec.reach_angstrom())
    start, nb, geo = neighbour_csr(pairs, pos, box, cutoff, spec.width_angstrom, n)
    kinds, params = spec.weights.arrays()
    phi, g = pair_csr_terms(start, nb, geo, codes, spec.n_species, kinds, params)
    arr = spec.angular_arrays()
    if arr is None:
        return FrameTerms(phi, start, nb, geo, g, None)
    if cutoff <= 0 and not given:   # paper-mode pairs: the angular list its own candidates within its cutoff
        pairs = neighbour_pairs(pos, box, arr.cutoff)
    # the pair list reaching as far: its nearer entries, not the geometry again
    csr = (start, nb, geo) if 0 < arr.cutoff <= cutoff else None
    ang = angular_frame(pos, box, codes, arr, pairs=pairs, values=angular_values, csr=csr)
    return FrameTerms(np.concatenate([phi, ang.x], axis=1) if angular_values else phi, start, nb, geo, g, ang)


def feature_forces(terms: FrameTerms, codes: np.ndarray, spec: FeatureSpec, dh: np.ndarray,
                   conservative: bool) -> np.ndarray:
    """Forces (N, 3) from dh[k, f] = dH_{s_k}/dx_f at x_k: -grad E (conservative) or each atom's
    own loss gradient with the others fixed (agent)."""
    p = spec.p
    f = pair_csr_forces(terms.start, terms.nb, terms.geo, codes, terms.g, np.ascontiguousarray(dh[:, :p]),
                        conservative)
    if terms.ang is not None:
        f += terms.ang.vjp(dh[:, p:], conservative)
    return f
