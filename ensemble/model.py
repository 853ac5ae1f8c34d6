"""Fitted models: coefficients, forces and accelerations, human-readable JSON.

A model has one quadratic loss per species s over the feature vector x_k of atom k
(:mod:`ensemble.features`): the pair invariants phi_k (P = n_species x n_weights,
source-major), then, for many-body models, the angular invariants rho_k / psi_k of
:mod:`ensemble.angular` (Q of them)::

    H_s(x) = A_s . x + 1/2 x . B_s . x           (eV; B_s symmetric, F = P + Q)

``agent``
    acceleration of atom k = -(1/M_s) grad_k H_s(x_k) with every other atom held
    fixed (the paper's eq. 4.6). Not the gradient of one energy.
``conservative``
    one energy E = sum_k H_{s_k}(x_k); forces -grad E, so each atom also feels
    its neighbours' losses. Energy and momentum are conserved.

Either kind may carry a :class:`ensemble.prior.ShortRangePrior`: a fixed pair repulsion below the
shortest training distances, added to the energy and forces (both kinds: it is a pair sum).

Model files (JSON, strict: no NaN / Infinity) have format ``ensemble.model/2``; files of format
``ensemble.model/1`` (pair invariants only, dense B) are read as well. Every field is checked on
reading (types, shapes, finite and sane magnitudes): a malformed file is a :class:`ModelError`
naming the file and the field. Saved models carry a ``digest``: a sha256 over everything that
determines the dynamics (kind, species, masses, weight functions, angular basis, cutoff, prior,
coefficients), verified on reading, so a model whose ``kind`` or a coefficient was edited by hand
is refused. Files without a digest (written before it existed) are read as they are.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numba import njit

from . import __version__
from .angular import AngularBasis, angular_frame, angular_linear_forces, neighbour_csr
from .features import FeatureSpec, feature_forces, frame_terms
from .invariants import (VerletList, WeightSet, check_cutoff, invariants_frame, neighbour_pairs, pair_geometry,
                         species_index, weight_plan, weight_values)
from .prior import ShortRangePrior, prior_energy_forces
from .units import EV_PER_ANGSTROM_AMU_TO_ANGSTROM_PER_FS2
from .errors import UserError

__all__ = ["Model", "ModelError", "load_model", "conservative_forces", "finite_json", "MAX_COEFFICIENT_EV",
           "DIGEST_SCHEME"]

KINDS = ("agent", "conservative")
FORMAT = "ensemble.model/2"
FORMAT_V1 = "ensemble.model/1"

#: the canonical form the model digest is computed over (see :meth:`Model.content_digest`)
DIGEST_SCHEME = "ensemble.model-content/1"

#: largest |coefficient| (eV) a model file may hold. Fitted coefficients are ~1e1-1e4 eV (the
#: standardized ridge keeps them there, see :func:`ensemble.fit.gram.solve_ridge`); 1e12 eV is far
#: beyond any fit and still leaves forces finite for a step, so a run stops with a clear error
MAX_COEFFICIENT_EV = 1e12

#: what the digest covers (written next to it, for a reader of the file)
DIGEST_COVERS = ("kind, species, masses_amu, weight_functions, angular_basis, neighbour_mode, cutoff_angstrom, "
                 "cutoff_width_angstrom, prior, coefficients")


def finite_json(obj):
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None, so that it is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return finite_json(obj.tolist())
    return obj


class ModelError(UserError, ValueError):
    """A model file is malformed or does not fit the configuration it is applied to."""


@njit(cache=True)
def conservative_forces(pos, box, species, n_species, kinds, params, cutoff, width, dh):
    """Forces (eV/Å) -grad E, pairs from cell lists (cutoff mode) or all pairs (paper mode)."""
    return conservative_forces_pairs(pos, box, species, n_species, kinds, params, cutoff, width, dh,
                                     neighbour_pairs(pos, box, cutoff))


@njit(cache=True)
def conservative_forces_pairs(pos, box, species, n_species, kinds, params, cutoff, width, dh, pairs):
    """Forces (eV/Å) -grad E for E = sum_k H_{s_k}(phi_k), given dh[k, f] = dH_{s_k}/dphi_f at phi_k.

    Pair {k, i} enters phi[k, (s_i, m)] and phi[i, (s_k, m)] with the same weight w_m(r), so its
    force is -(dh[k, (s_i, m)] + dh[i, (s_k, m)]) (w_m fc)'(r) (q_k - q_i) / r on k, opposite on i.
    Each pair of the candidate list (k < i) is visited once; pairs beyond the cutoff add nothing.
    """
    n = pos.shape[0]
    m_w = kinds.shape[0]
    plan = weight_plan(kinds, params)
    w = np.empty(m_w)
    dw = np.empty(m_w)
    f = np.zeros((n, 3))
    for q in range(pairs.shape[0]):
        k = pairs[q, 0]
        i = pairs[q, 1]
        inside, dx, dy, dz, r, fc, dfc = pair_geometry(k, i, pos, box, cutoff, width)
        if not inside:
            continue
        ak = species[i] * m_w
        ai = species[k] * m_w
        s = 0.0
        ir = weight_values(kinds, plan, r, w, dw)
        for mm in range(m_w):
            s += (dh[k, ak + mm] + dh[i, ai + mm]) * (dw[mm] * fc + w[mm] * dfc)
        s *= ir
        f[k, 0] -= s * dx
        f[k, 1] -= s * dy
        f[k, 2] -= s * dz
        f[i, 0] += s * dx
        f[i, 1] += s * dy
        f[i, 2] += s * dz
    return f


@njit(cache=True)
def pair_terms(pos, box, species, n_species, kinds, params, cutoff, width, pairs):
    """One pass over candidate pairs (k < i): invariants phi (N, S*M) and, per pair, the separation
    d = q_k - q_i (3,) and g_m = (w_m fc)'(r) / r (M,) (zero beyond the cutoff), from which the
    forces of either kind follow without evaluating any weight function again."""
    n = pos.shape[0]
    m_w = kinds.shape[0]
    plan = weight_plan(kinds, params)
    w = np.empty(m_w)
    dw = np.empty(m_w)
    phi = np.zeros((n, n_species * m_w))
    g = np.zeros((pairs.shape[0], m_w))
    d = np.zeros((pairs.shape[0], 3))
    for q in range(pairs.shape[0]):
        k = pairs[q, 0]
        i = pairs[q, 1]
        inside, dx, dy, dz, r, fc, dfc = pair_geometry(k, i, pos, box, cutoff, width)
        if not inside:
            continue
        d[q, 0] = dx
        d[q, 1] = dy
        d[q, 2] = dz
        ak = species[i] * m_w
        ai = species[k] * m_w
        ir = weight_values(kinds, plan, r, w, dw)
        for mm in range(m_w):
            phi[k, ak + mm] += w[mm] * fc
            phi[i, ai + mm] += w[mm] * fc
            g[q, mm] = (dw[mm] * fc + w[mm] * dfc) * ir
    return phi, g, d


@njit(cache=True)
def forces_from_pair_terms(pairs, species, m_w, dh, g, d, conservative):
    """Forces (eV/Å) from :func:`pair_terms` and dh[k, f] = dH_{s_k}/dphi_f.

    Agent: atom k feels only its own loss, -sum_m dh[k, (s_i, m)] g_m d on k and
    +sum_m dh[i, (s_k, m)] g_m d on i. Conservative: both terms act on both atoms."""
    n = dh.shape[0]
    f = np.zeros((n, 3))
    for q in range(pairs.shape[0]):
        k = pairs[q, 0]
        i = pairs[q, 1]
        ak = species[i] * m_w
        ai = species[k] * m_w
        sk = 0.0
        si = 0.0
        for mm in range(m_w):
            sk += dh[k, ak + mm] * g[q, mm]
            si += dh[i, ai + mm] * g[q, mm]
        if conservative:
            sk += si
            si = sk
        for c in range(3):
            f[k, c] -= sk * d[q, c]
            f[i, c] += si * d[q, c]
    return f


@dataclass(frozen=True)
class Model:
    """A fitted model (see the module docstring). ``A[s]`` is (F,), ``B[s]`` (F, F) symmetric, eV,
    over the features of :attr:`spec` (pair invariants, then the angular ones if ``angular``)."""

    kind: str
    species: tuple[str, ...]
    masses: tuple[float, ...]
    weights: WeightSet
    A: tuple[np.ndarray, ...]
    B: tuple[np.ndarray, ...]
    cutoff_angstrom: float | None = None
    width_angstrom: float = 1.0
    metrics: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    angular: AngularBasis | None = None
    prior: ShortRangePrior | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ModelError(f"model kind {self.kind!r}; expected one of {KINDS}")
        p = self.spec.n_features
        extra = f" + {self.spec.q} angular features" if self.angular is not None else ""
        for s, (a, b) in enumerate(zip(self.A, self.B)):
            if np.shape(a) != (p,) or np.shape(b) != (p, p):
                raise ModelError(f"species {self.species[s]}: A must have {p} entries and B be {p}x{p} "
                                 f"({len(self.species)} species x {len(self.weights)} weight functions{extra}); "
                                 f"got {np.shape(a)} and {np.shape(b)}")
            if not np.allclose(b, np.transpose(b), rtol=1e-12, atol=0):
                raise ModelError(f"species {self.species[s]}: B is not symmetric")
        if len(self.A) != len(self.species) or len(self.masses) != len(self.species):
            raise ModelError("one A, B and mass per species is required")
        if self.prior is not None and tuple(self.prior.species) != tuple(self.species):
            raise ModelError(f"prior species {self.prior.species} differ from the model's {self.species}")

    @property
    def neighbour_mode(self) -> str:
        return "paper" if self.cutoff_angstrom is None else "cutoff"

    @property
    def spec(self) -> FeatureSpec:
        """The feature layout (pair invariants, then angular ones). Built on each access (cheap): a
        Model keeps nothing but its fields, so ``Model(**model.__dict__)`` round-trips."""
        return FeatureSpec(len(self.species), self.weights, self.angular, "none", self.cutoff_angstrom,
                           self.width_angstrom)

    @property
    def _quadratic_blocks(self) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        """Per species, the features with any quadratic coefficient and B restricted to them."""
        out = []
        for b in self.B:
            act = np.flatnonzero(np.any(b != 0, axis=0))
            bq = np.ascontiguousarray(b[np.ix_(act, act)])
            if act.size and act[-1] == act.size - 1:         # a leading range (the pair invariants): a view
                act = slice(0, act.size)
            out.append((act, bq))
        return tuple(out)

    # ---------------------------------------------------------------- evaluation
    def _setup(self, species, box):
        codes, _ = species_index(species, list(self.species))
        cutoff, width = check_cutoff(self.cutoff_angstrom, self.width_angstrom, np.asarray(box))
        if self.angular is not None:
            check_cutoff(self.angular.cutoff_angstrom, self.angular.cutoff_width_angstrom, np.asarray(box))
        kinds, params = self.weights.arrays()
        return codes, cutoff, width, kinds, params

    def dh_dphi(self, phi: np.ndarray, codes: np.ndarray, blocks=None, linear=None, groups=None) -> np.ndarray:
        """dH_{s_k}/dx at each atom's features: (N, F) (``blocks``: :attr:`_quadratic_blocks`, if at hand;
        ``linear``: per species the linear coefficients of the leading F features, default all of A;
        ``groups``: per species the indices of its atoms, if at hand)."""
        out = np.empty_like(phi)
        linear = self.A if linear is None else linear
        for s, (act, bq) in enumerate(self._quadratic_blocks if blocks is None else blocks):
            at = np.flatnonzero(codes == s) if groups is None else groups[s]
            out[at] = linear[s]
            if bq.size:
                if isinstance(act, slice):
                    out[at, act] += phi[at, act] @ bq
                else:
                    out[np.ix_(at, act)] += phi[np.ix_(at, act)] @ bq
        return out

    def _loss_sum(self, x: np.ndarray, codes: np.ndarray, blocks=None, linear=None) -> float:
        """sum_k H_{s_k}(x_k) (eV) (``linear`` as in :meth:`dh_dphi`)."""
        e = 0.0
        linear = self.A if linear is None else linear
        for s, (act, bq) in enumerate(self._quadratic_blocks if blocks is None else blocks):
            at = np.flatnonzero(codes == s)
            e += float(np.sum(x[at] @ linear[s]))
            if bq.size:
                xa = x[at, act] if isinstance(act, slice) else x[np.ix_(at, act)]
                e += 0.5 * float(np.sum((xa @ bq) * xa))
        return e

    @property
    def _generic(self) -> bool:
        """Many-body or prior-carrying models take the feature path; pair-only ones the original kernels."""
        return self.angular is not None or self.prior is not None

    def features(self, positions, box, species) -> np.ndarray:
        """Features x (N, F) of one configuration (pair invariants, then angular ones)."""
        codes, *_ = self._setup(species, box)
        return frame_terms(np.asarray(positions, float), np.asarray(box, float), codes, self.spec).x

    def energy(self, positions, box, species) -> float:
        """E = sum_k H_{s_k}(x_k) (+ the prior) in eV (the conservative kind's energy; for the agent kind
        the sum of the agents' losses, which is not a potential of its forces)."""
        codes, cutoff, width, kinds, params = self._setup(species, box)
        pos, bx = np.asarray(positions, float), np.asarray(box, float)
        if self._generic:
            e = self._loss_sum(frame_terms(pos, bx, codes, self.spec).x, codes)
            if self.prior is not None:
                e += self.prior.energy_forces(pos, bx, codes)[0]
            return e
        phi, _ = invariants_frame(pos, bx, codes, len(self.species), kinds, params, cutoff, width)
        return self._loss_sum(phi.reshape(len(codes), -1), codes)

    def force_fn(self, box, species, skin_angstrom: float = 1.0):
        """A force function for MD: positions (N, 3) -> (forces eV/Å, energy eV).

        The energy is E = sum_k H_{s_k}(x_k) (+ prior): the conservative kind's potential; for the agent
        kind the summed losses (reported, but not conserved: agent forces are not -grad E).
        In cutoff mode pairs come from a Verlet list (largest cutoff + ``skin_angstrom``); results do not
        depend on when it was rebuilt.
        """
        codes, cutoff, width, kinds, params = self._setup(species, box)
        bx = np.asarray(box, float)
        n_sp = len(self.species)
        agent = self.kind == "agent"
        n_all = len(codes)
        if self._generic:
            return self._generic_force_fn(codes, bx, cutoff, width, kinds, params, skin_angstrom)
        verlet = VerletList(bx, cutoff, skin_angstrom) if cutoff > 0 else None
        blocks = self._quadratic_blocks

        def fn(positions):
            pos = np.ascontiguousarray(positions, dtype=float)
            if verlet is not None:
                # cutoff mode: one pass over the Verlet list, per-pair terms reused for the forces
                pairs = verlet(pos)
                phi, g, d = pair_terms(pos, bx, codes, n_sp, kinds, params, cutoff, width, pairs)
                dh = self.dh_dphi(phi, codes, blocks)
                return (forces_from_pair_terms(pairs, codes, len(kinds), dh, g, d, not agent),
                        self._loss_sum(phi, codes, blocks))
            # paper mode: all N^2 pairs, without per-pair arrays
            phi, grad = invariants_frame(pos, bx, codes, n_sp, kinds, params, cutoff, width)
            phi = phi.reshape(n_all, -1)
            dh = self.dh_dphi(phi, codes, blocks)
            if agent:
                return (-np.einsum("kj,kjc->kc", dh, grad.reshape(n_all, phi.shape[1], 3)),
                        self._loss_sum(phi, codes, blocks))
            return (conservative_forces(pos, bx, codes, n_sp, kinds, params, cutoff, width, dh),
                    self._loss_sum(phi, codes, blocks))

        fn.neighbours = verlet
        return fn

    def _generic_force_fn(self, codes, bx, cutoff, width, kinds, params, skin):
        """Forces of many-body / prior models: pair terms from the candidate list (k < i), angular
        features and their vector-Jacobian product from the same list (one fused pass when the
        energy is linear in the angular features, as in the default model), the prior on top."""
        n_sp = len(self.species)
        conservative = self.kind == "conservative"
        spec = self.spec
        p = spec.p
        arr = spec.angular_arrays()
        blocks = self._quadratic_blocks
        prior = self.prior
        onset = prior.onset_angstrom if prior is not None else None
        reach = max(spec.reach_angstrom(), float(onset.max()) if prior is not None else 0.0)
        if cutoff > 0:
            verlet = VerletList(bx, reach, skin)
            ang_verlet = None
        else:        # paper-mode pairs: every pair, always; the angular list on its own
            verlet = None
            all_pairs = neighbour_pairs(np.zeros((len(codes), 3)), bx, -1.0)
            ang_verlet = VerletList(bx, arr.cutoff, skin) if arr is not None else None

        # energy linear in the angular features (no quadratic coefficient on them, the default):
        # dE/dx is a constant per species there, and features and forces come from one fused pass
        linear_angular = arr is not None and all(
            (act.stop if isinstance(act, slice) else (int(act.max()) + 1 if act.size else 0)) <= p
            for act, _ in blocks)
        dh_angular = np.ascontiguousarray(np.stack([a[p:] for a in self.A])) if linear_angular else None
        a_pair = tuple(a[:p] for a in self.A)

        def fn(positions):
            pos = np.ascontiguousarray(positions, dtype=float)
            pairs = verlet(pos) if verlet is not None else all_pairs
            phi, g, d = pair_terms(pos, bx, codes, n_sp, kinds, params, cutoff, width, pairs)
            if linear_angular:
                # the angular energy and forces from the fused kernel; dH/dphi and H over the pair block
                start, nb, geo = neighbour_csr(pairs if ang_verlet is None else ang_verlet(pos), pos, bx, arr.cutoff,
                                               arr.width, len(codes))
                f, e = angular_linear_forces(start, nb, geo, codes, dh_angular, conservative, *arr.args())
                dh = self.dh_dphi(phi, codes, blocks, a_pair)
                f += forces_from_pair_terms(pairs, codes, len(kinds), dh, g, d, conservative)
                e += self._loss_sum(phi, codes, blocks, a_pair)
            else:
                if arr is not None:
                    fr = angular_frame(pos, bx, codes, arr, pairs=pairs if ang_verlet is None else ang_verlet(pos))
                    x = np.concatenate([phi, fr.x], axis=1)
                else:
                    x = phi
                dh = self.dh_dphi(x, codes, blocks)
                f = forces_from_pair_terms(pairs, codes, len(kinds), np.ascontiguousarray(dh[:, :p]), g, d,
                                           conservative)
                if arr is not None:
                    f += fr.vjp(dh[:, p:], conservative)
                e = self._loss_sum(x, codes, blocks)
            if prior is not None:
                ep, fp = prior_energy_forces(pos, bx, codes, onset, prior.epsilon_ev, prior.decay_angstrom, pairs)
                f += fp
                e += ep
            return f, e

        fn.neighbours = verlet if verlet is not None else ang_verlet
        fn.fused_angular = linear_angular
        return fn

    def features_over(self, positions, box, species, pairs) -> np.ndarray:
        """Features x (N, F) as if only ``pairs`` (k < i) existed: pair and angular sums over that list."""
        codes, *_ = self._setup(species, box)
        return frame_terms(np.asarray(positions, float), np.asarray(box, float), codes, self.spec,
                           pairs=np.asarray(pairs, np.int64).reshape(-1, 2)).x

    def restricted_force_fn(self, box, species, pairs, feature_shift=None, *, with_energy: bool = True):
        """Force function of E_r = sum_k H_{s_k}(x_k^r + c_k): the model's energy over a fixed list of
        ``pairs`` (k < i) only, features offset by the constant ``feature_shift`` c (N, F; default 0).

        A smooth, fixed function of the positions (the pair list does not change, so E_r is a
        Hamiltonian of its own), conservative kind only; the prior is not part of it. With the pairs
        inside molecules and c their mean environment, E_r is the stiff intramolecular part of the
        model that :func:`ensemble.md.respa.respa` integrates with the short step.
        ``with_energy=False`` returns NaN for the energy (the inner steps need forces only).
        """
        if self.kind != "conservative":
            raise ModelError(f"a restricted energy needs a conservative model; this one is {self.kind!r}")
        codes, cutoff, width, kinds, params = self._setup(species, box)
        bx = np.asarray(box, float)
        pairs = np.ascontiguousarray(np.asarray(pairs, np.int64).reshape(-1, 2))
        if pairs.size and not (pairs.min() >= 0 and pairs.max() < len(codes) and (pairs[:, 0] < pairs[:, 1]).all()):
            raise ModelError(f"restricted pairs must be (k < i) atom indices below {len(codes)}")
        n_f = self.spec.n_features
        shift = np.zeros((len(codes), n_f)) if feature_shift is None else np.asarray(feature_shift, float)
        if shift.shape != (len(codes), n_f) or not np.isfinite(shift).all():
            raise ModelError(f"feature_shift must be finite with shape {(len(codes), n_f)}, got {shift.shape}")
        n_sp = len(self.species)
        spec = self.spec
        generic = self._generic
        blocks = self._quadratic_blocks
        groups = [np.flatnonzero(codes == s) for s in range(n_sp)]

        def fn(positions):
            pos = np.ascontiguousarray(positions, dtype=float)
            if generic:
                terms = frame_terms(pos, bx, codes, spec, pairs=pairs)
                x = terms.x + shift
                f = feature_forces(terms, codes, spec, self.dh_dphi(x, codes, blocks, groups=groups), True)
            else:
                phi, g, d = pair_terms(pos, bx, codes, n_sp, kinds, params, cutoff, width, pairs)
                x = phi + shift
                f = forces_from_pair_terms(pairs, codes, len(kinds), self.dh_dphi(x, codes, blocks, groups=groups),
                                           g, d, True)
            return f, (self._loss_sum(x, codes, blocks) if with_energy else float("nan"))

        return fn

    def forces(self, positions, box, species) -> np.ndarray:
        """Forces (eV/Å): -grad E (conservative) or -grad_k H_{s_k} with others fixed (agent); plus the prior."""
        codes, cutoff, width, kinds, params = self._setup(species, box)
        pos = np.ascontiguousarray(positions, dtype=float)
        bx = np.asarray(box, float)
        if self._generic:
            spec = self.spec
            terms = frame_terms(pos, bx, codes, spec)
            f = feature_forces(terms, codes, spec, self.dh_dphi(terms.x, codes), self.kind == "conservative")
            if self.prior is not None:
                f += self.prior.energy_forces(pos, bx, codes)[1]
            return f
        phi, grad = invariants_frame(pos, bx, codes, len(self.species), kinds, params, cutoff, width)
        n = len(codes)
        phi = phi.reshape(n, -1)
        dh = self.dh_dphi(phi, codes)
        if self.kind == "agent":
            return -np.einsum("kj,kjc->kc", dh, grad.reshape(n, phi.shape[1], 3))
        return conservative_forces(pos, bx, codes, len(self.species), kinds, params, cutoff, width, dh)

    def accelerations(self, positions, box, species) -> np.ndarray:
        """Accelerations (Å/fs^2): forces / masses."""
        codes, _ = species_index(species, list(self.species))
        mass = np.asarray(self.masses)[codes]
        return self.forces(positions, box, species) / mass[:, None] * EV_PER_ANGSTROM_AMU_TO_ANGSTROM_PER_FS2

    # ---------------------------------------------------------------- JSON
    def to_json(self) -> dict:
        def quadratic(b):
            j, l = np.nonzero(np.triu(b))
            return [[int(a), int(c), float(b[a, c])] for a, c in zip(j, l)]

        for arr in self.A + self.B:
            if not np.isfinite(arr).all():
                raise ModelError("non-finite coefficient: refusing to write the model")
        return {
            "format": FORMAT,
            "kind": self.kind,
            "species": list(self.species),
            "masses_amu": dict(zip(self.species, self.masses)),
            "weight_functions": self.weights.to_json(),
            "angular_basis": self.angular.to_json() if self.angular is not None else None,
            "feature_order": "x = [phi: source-major, index = source_species_index * n_weights + weight_index; then "
                             "rho[a * n_radial + n]; then psi[channel * (l_max + 1) + l], channels (a <= b, n, m) "
                             "as in feature_labels]",
            "feature_labels": self.spec.labels(self.species),
            "neighbour_mode": self.neighbour_mode,
            "cutoff_angstrom": self.cutoff_angstrom,
            "cutoff_width_angstrom": self.width_angstrom,
            "units": {"A": "eV", "B": "eV", "phi": "1 (sum of weights)", "rho, psi": "1"},
            "loss": "H_s(x) = A_s . x + 1/2 x . B_s . x, B_s symmetric; B_nonzero_upper lists [j, l, B_jl] for j <= l",
            "coefficients": {s: {"A": self.A[i].tolist(), "B_nonzero_upper": quadratic(self.B[i])}
                             for i, s in enumerate(self.species)},
            "prior": self.prior.to_json() if self.prior is not None else None,
            "metrics": finite_json(self.metrics),
            "provenance": finite_json({**self.provenance, "ensemble_version": __version__}),
        }

    def content_digest(self) -> str:
        """sha256 (hex) over a canonical JSON of everything that determines the dynamics: kind, species,
        masses, weight functions, angular basis, neighbour mode, cutoff and width, prior and
        coefficients (not metrics or provenance). Scheme :data:`DIGEST_SCHEME`."""
        d = self.to_json()
        content = {"scheme": DIGEST_SCHEME, **{k: d[k] for k in _DIGEST_FIELDS}}
        text = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write as strict JSON (no NaN / Infinity) with its :meth:`content_digest`, atomically
        (temporary file, then rename)."""
        from .io.store import atomic_write_text

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        d = self.to_json()
        d["digest"] = {"sha256": self.content_digest(), "scheme": DIGEST_SCHEME, "covers": DIGEST_COVERS}
        return atomic_write_text(path, json.dumps(d, indent=1, allow_nan=False))

    @classmethod
    def from_json(cls, d: dict, source: str = "<model>") -> "Model":
        """A model from its JSON form; every field is checked (a :class:`ModelError` names the file
        and the field), and a ``digest``, if present, must match the content."""
        if not isinstance(d, dict):
            raise ModelError(f"{source}: expected a JSON object (a model file from `ensemble fit`), got "
                             f"{_json_type(d)}")

        def need(key):
            if key not in d:
                raise ModelError(f"{source}: missing field {key!r}")
            return d[key]

        fmt = need("format")
        if fmt not in (FORMAT, FORMAT_V1):
            raise ModelError(f"{source}: format {fmt!r}; expected {FORMAT!r} (or {FORMAT_V1!r})")
        kind = need("kind")
        if kind not in KINDS:
            raise ModelError(f"{source}: model kind {kind!r} (field 'kind'); expected one of {KINDS}")
        species_raw = need("species")
        if (not isinstance(species_raw, list) or not species_raw
                or not all(isinstance(s, str) and s for s in species_raw)):
            raise ModelError(f"{source}: field 'species' must be a non-empty list of element names, got "
                             f"{species_raw!r:.80}")
        if len(set(species_raw)) != len(species_raw):
            raise ModelError(f"{source}: field 'species' lists a species twice: {species_raw}")
        species = tuple(species_raw)
        masses = need("masses_amu")
        if not isinstance(masses, dict):
            raise ModelError(f"{source}: field 'masses_amu' must be an object {{species: mass in amu}}, got "
                             f"{_json_type(masses)}")
        for s in species:
            if s not in masses:
                raise ModelError(f"{source}: field 'masses_amu' has no mass for species {s!r}")
            _number(masses[s], f"{source}: masses_amu[{s!r}]", positive=True)
        coefs = need("coefficients")
        if not isinstance(coefs, dict):
            raise ModelError(f"{source}: field 'coefficients' must be an object {{species: {{'A': [...], ...}}}}, "
                             f"got {_json_type(coefs)}")
        for s in species:
            if not isinstance(coefs.get(s), dict):
                raise ModelError(f"{source}: coefficients[{s!r}] must be an object {{'A': [...], ...}}, got "
                                 f"{_json_type(coefs.get(s)) if s in coefs else 'nothing (missing)'}")
        wf = need("weight_functions")
        try:
            weights = WeightSet.from_json(wf)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise ModelError(f"{source}: field 'weight_functions': {exc}") from None
        if not len(weights):
            raise ModelError(f"{source}: field 'weight_functions' is empty; a model needs at least one")
        angular = prior = None
        if fmt == FORMAT:
            for key, build in (("angular_basis", lambda v: AngularBasis.from_json(v)),
                               ("prior", lambda v: ShortRangePrior.from_json(v, species))):
                if d.get(key) is None:
                    continue
                try:
                    obj = build(d[key])
                except (ValueError, TypeError, AttributeError, KeyError) as exc:
                    raise ModelError(f"{source}: field {key!r} is malformed ({type(exc).__name__}: {exc})") from None
                if key == "angular_basis":
                    angular = obj
                else:
                    prior = obj
        mode = need("neighbour_mode")
        cutoff = d.get("cutoff_angstrom")
        if mode not in ("paper", "cutoff") or (mode == "cutoff") != (cutoff is not None):
            raise ModelError(f"{source}: neighbour_mode {mode!r} with cutoff_angstrom {cutoff!r} is inconsistent "
                             "(expected 'paper' with null, or 'cutoff' with a number of Å)")
        if cutoff is not None:
            cutoff = _number(cutoff, f"{source}: cutoff_angstrom", positive=True)
        width = _number(d.get("cutoff_width_angstrom", 1.0), f"{source}: cutoff_width_angstrom", positive=True)
        n_feat = len(species) * len(weights) + (angular.n_features(len(species)) if angular is not None else 0)
        a, b = [], []
        for s in species:
            a.append(_vector(coefs[s].get("A"), n_feat, f"{source}: coefficients[{s!r}]['A']"))
            if fmt == FORMAT_V1:
                b.append(_matrix(coefs[s].get("B"), n_feat, f"{source}: species {s}", f"coefficients[{s!r}]['B']"))
            else:
                b.append(_upper(coefs[s].get("B_nonzero_upper"), n_feat, f"{source}: species {s}",
                                f"coefficients[{s!r}]['B_nonzero_upper']"))
        for key in ("metrics", "provenance"):
            if not isinstance(d.get(key, {}), dict):
                raise ModelError(f"{source}: field {key!r} must be an object, got {_json_type(d[key])}")
        try:
            model = cls(kind=kind, species=species, masses=tuple(float(masses[s]) for s in species),
                        weights=weights, A=tuple(a), B=tuple(b), cutoff_angstrom=cutoff, width_angstrom=width,
                        metrics=d.get("metrics", {}), provenance=d.get("provenance", {}), angular=angular,
                        prior=prior)
        except ModelError as exc:
            raise ModelError(f"{source}: {exc}") from None
        digest = d.get("digest")
        if digest is not None:
            want = digest.get("sha256") if isinstance(digest, dict) else None
            if not isinstance(want, str) or digest.get("scheme") != DIGEST_SCHEME:
                raise ModelError(f"{source}: field 'digest' must be {{'sha256': hex, 'scheme': {DIGEST_SCHEME!r}}}, "
                                 f"got {digest!r:.120}")
            got = model.content_digest()
            if got != want:
                raise ModelError(f"{source}: the content digest does not match (file says sha256 {want[:12]}..., "
                                 f"the content gives {got[:12]}...): the model was edited after fitting (kind, "
                                 "species, masses, basis, cutoff, prior or coefficients); refit it, or remove the "
                                 "'digest' field to use it as edited")
        return model


#: the fields of :meth:`Model.to_json` that :meth:`Model.content_digest` covers
_DIGEST_FIELDS = ("kind", "species", "masses_amu", "weight_functions", "angular_basis", "neighbour_mode",
                  "cutoff_angstrom", "cutoff_width_angstrom", "prior", "coefficients")


def _json_type(v) -> str:
    """How a JSON value reads to a user: ``null``, ``a string ('x')``, ``a list of 3``, ..."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"{str(v).lower()}"
    if isinstance(v, str):
        return f"a string ({v!r:.40})"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    if isinstance(v, list):
        return f"a list of {len(v)}"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(v, where: str, *, positive: bool = False) -> float:
    """A finite JSON number (> 0 if ``positive``), else a ModelError naming ``where``."""
    if not _is_number(v):
        raise ModelError(f"{where} must be a number, got {_json_type(v)}")
    if not math.isfinite(v) or (positive and not v > 0):
        raise ModelError(f"{where} must be a finite number{' > 0' if positive else ''}, got {v!r}")
    return float(v)


def _coefficient(v, where: str) -> float:
    if not _is_number(v):
        raise ModelError(f"{where} must be a number (eV), got {_json_type(v)}")
    if not math.isfinite(v) or abs(v) > MAX_COEFFICIENT_EV:
        raise ModelError(f"{where} is {v!r}; coefficients must be finite with |c| <= {MAX_COEFFICIENT_EV:g} eV "
                         "(a fit never gives such values: the file is damaged or was edited)")
    return float(v)


def _vector(v, n: int, where: str) -> np.ndarray:
    if not isinstance(v, list):
        raise ModelError(f"{where} must be a list of {n} numbers (eV), got "
                         f"{_json_type(v) if v is not None else 'null (or nothing)'}")
    if len(v) != n:
        raise ModelError(f"{where} must have {n} entries (one per feature), got {len(v)}")
    return np.array([_coefficient(x, f"{where}[{i}]") for i, x in enumerate(v)], dtype=float)


def _matrix(v, n: int, who: str, name: str) -> np.ndarray:
    """A dense (format 1) B: ``who`` names file and species, ``name`` the field."""
    if not isinstance(v, list) or len(v) != n or not all(isinstance(r, list) and len(r) == n for r in v):
        got = (f"{len(v)} rows of lengths {sorted({len(r) if isinstance(r, list) else -1 for r in v})}"
               if isinstance(v, list) else _json_type(v))
        raise ModelError(f"{who}: A must have {n} entries and B be {n}x{n} ({name} as a list of {n} lists of "
                         f"numbers, eV); got {got}")
    where = f"{who}: {name}"
    return np.array([[_coefficient(x, f"{where}[{i}][{j}]") for j, x in enumerate(r)] for i, r in enumerate(v)])


def _upper(v, n: int, who: str, name: str) -> np.ndarray:
    """B from its [j, l, B_jl] (j <= l) triples: ``who`` names file and species, ``name`` the field."""
    where = f"{who}: {name}"
    if not isinstance(v, list):
        raise ModelError(f"{where} must be a list of [j, l, B_jl] triples, got {_json_type(v)}")
    mat = np.zeros((n, n))
    for q, t in enumerate(v):
        if not (isinstance(t, list) and len(t) == 3 and all(isinstance(i, int) and not isinstance(i, bool)
                                                            for i in t[:2])):
            raise ModelError(f"{where}[{q}] must be [j, l, B_jl] with integer j, l, got {t!r:.60}")
        j, l, x = t
        if not 0 <= j <= l < n:
            raise ModelError(f"{who}: B index ({j}, {l}) outside 0 <= j <= l < {n} ({name}[{q}])")
        mat[j, l] = mat[l, j] = _coefficient(x, f"{where}[{q}]")
    return mat


def load_model(path: str | Path) -> Model:
    """Read a model JSON file; malformed files give a ModelError naming the file and field."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file" + (" (a directory)" if path.is_dir() else ""))
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ModelError(f"{path}: not a UTF-8 text file (a model is the JSON file `ensemble fit` writes)") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not JSON ({exc})") from None
    except RecursionError:
        raise ModelError(f"{path}: not a model (JSON nested too deeply)") from None
    return Model.from_json(d, str(path))


def coefficients_from_columns(coef: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, symmetric B) from a column vector [A (P), B upper triangle (P(P+1)/2)]."""
    a = np.asarray(coef[:p], dtype=float)
    b = np.zeros((p, p))
    if coef.shape[0] > p:
        j, l = np.triu_indices(p)
        b[j, l] = coef[p:]
        b[l, j] = coef[p:]
    return a, b


