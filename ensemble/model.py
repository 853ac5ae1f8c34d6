"""Fitted models: coefficients, forces and accelerations, human-readable JSON.

A model has one quadratic loss per species s over the flattened invariants
phi_k (P = n_species x n_weights, source-major)::

    H_s(phi) = A_s . phi + 1/2 phi . B_s . phi           (eV; B_s symmetric)

``agent``
    acceleration of atom k = -(1/M_s) grad_k H_s(phi_k) with every other atom held
    fixed (the paper's eq. 4.6). Not the gradient of one energy.
``conservative``
    one energy E = sum_k H_{s_k}(phi_k); forces -grad E, so each atom also feels
    its neighbours' losses. Energy and momentum are conserved.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numba import njit

from . import __version__
from .invariants import (VerletList, WeightSet, _weight, check_cutoff, invariants_frame, neighbour_pairs, pair_geometry, species_index)
from .units import EV_PER_ANGSTROM_AMU_TO_ANGSTROM_PER_FS2
from .errors import UserError

__all__ = ["Model", "ModelError", "load_model", "conservative_forces"]

KINDS = ("agent", "conservative")
FORMAT = "ensemble.model/1"


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
        for mm in range(m_w):
            w, dw = _weight(kinds[mm], params[mm], r)
            s += (dh[k, ak + mm] + dh[i, ai + mm]) * (dw * fc + w * dfc)
        s /= r
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
        for mm in range(m_w):
            w, dw = _weight(kinds[mm], params[mm], r)
            phi[k, ak + mm] += w * fc
            phi[i, ai + mm] += w * fc
            g[q, mm] = (dw * fc + w * dfc) / r
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
    """A fitted model (see the module docstring). ``A[s]`` is (P,), ``B[s]`` (P, P) symmetric, eV."""

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

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ModelError(f"model kind {self.kind!r}; expected one of {KINDS}")
        p = len(self.species) * len(self.weights)
        for s, (a, b) in enumerate(zip(self.A, self.B)):
            if np.shape(a) != (p,) or np.shape(b) != (p, p):
                raise ModelError(f"species {self.species[s]}: A must have {p} entries and B be {p}x{p} "
                                 f"({len(self.species)} species x {len(self.weights)} weight functions); "
                                 f"got {np.shape(a)} and {np.shape(b)}")
            if not np.allclose(b, np.transpose(b), rtol=1e-12, atol=0):
                raise ModelError(f"species {self.species[s]}: B is not symmetric")
        if len(self.A) != len(self.species) or len(self.masses) != len(self.species):
            raise ModelError("one A, B and mass per species is required")

    @property
    def neighbour_mode(self) -> str:
        return "paper" if self.cutoff_angstrom is None else "cutoff"

    # ---------------------------------------------------------------- evaluation
    def _setup(self, species, box):
        codes, _ = species_index(species, list(self.species))
        cutoff, width = check_cutoff(self.cutoff_angstrom, self.width_angstrom, np.asarray(box))
        kinds, params = self.weights.arrays()
        return codes, cutoff, width, kinds, params

    def dh_dphi(self, phi: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """dH_{s_k}/dphi at each atom's invariants: (N, P)."""
        out = np.empty_like(phi)
        for s in range(len(self.species)):
            at = codes == s
            out[at] = self.A[s] + phi[at] @ self.B[s]
        return out

    def energy(self, positions, box, species) -> float:
        """E = sum_k H_{s_k}(phi_k) in eV (the conservative kind's energy; for the agent kind the
        sum of the agents' losses, which is not a potential of its forces)."""
        codes, cutoff, width, kinds, params = self._setup(species, box)
        phi, _ = invariants_frame(np.asarray(positions, float), np.asarray(box, float), codes, len(self.species),
                                  kinds, params, cutoff, width)
        phi = phi.reshape(len(codes), -1)
        total = 0.0
        for s in range(len(self.species)):
            ph = phi[codes == s]
            total += float(np.sum(ph @ self.A[s]) + 0.5 * np.einsum("kj,jl,kl->", ph, self.B[s], ph))
        return total

    def force_fn(self, box, species, skin_angstrom: float = 1.0):
        """A force function for MD: positions (N, 3) -> (forces eV/Å, energy eV).

        The energy is E = sum_k H_{s_k}(phi_k): the conservative kind's potential; for the agent
        kind the summed losses (reported, but not conserved: agent forces are not -grad E).
        In cutoff mode pairs come from a Verlet list (cutoff + ``skin_angstrom``); results do not
        depend on when it was rebuilt.
        """
        codes, cutoff, width, kinds, params = self._setup(species, box)
        bx = np.asarray(box, float)
        n_sp = len(self.species)
        agent = self.kind == "agent"
        n_all = len(codes)
        verlet = VerletList(bx, cutoff, skin_angstrom) if cutoff > 0 else None

        def energy_of(phi):
            e = 0.0
            for s in range(n_sp):
                at = codes == s
                e += float(np.sum(phi[at] @ self.A[s]) + 0.5 * np.sum((phi[at] @ self.B[s]) * phi[at]))
            return e

        def fn(positions):
            pos = np.ascontiguousarray(positions, dtype=float)
            if verlet is not None:
                # cutoff mode: one pass over the Verlet list, per-pair terms reused for the forces
                pairs = verlet(pos)
                phi, g, d = pair_terms(pos, bx, codes, n_sp, kinds, params, cutoff, width, pairs)
                dh = self.dh_dphi(phi, codes)
                return forces_from_pair_terms(pairs, codes, len(kinds), dh, g, d, not agent), energy_of(phi)
            # paper mode: all N^2 pairs, without per-pair arrays
            phi, grad = invariants_frame(pos, bx, codes, n_sp, kinds, params, cutoff, width)
            phi = phi.reshape(n_all, -1)
            dh = self.dh_dphi(phi, codes)
            if agent:
                return -np.einsum("kj,kjc->kc", dh, grad.reshape(n_all, phi.shape[1], 3)), energy_of(phi)
            return conservative_forces(pos, bx, codes, n_sp, kinds, params, cutoff, width, dh), energy_of(phi)

        fn.neighbours = verlet
        return fn

    def forces(self, positions, box, species) -> np.ndarray:
        """Forces (eV/Å): -grad E (conservative) or -grad_k H_{s_k} with others fixed (agent)."""
        codes, cutoff, width, kinds, params = self._setup(species, box)
        pos = np.ascontiguousarray(positions, dtype=float)
        bx = np.asarray(box, float)
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
        return {
            "format": FORMAT,
            "kind": self.kind,
            "species": list(self.species),
            "masses_amu": dict(zip(self.species, self.masses)),
            "weight_functions": self.weights.to_json(),
            "invariant_order": "source-major: index = source_species_index * n_weights + weight_index",
            "neighbour_mode": self.neighbour_mode,
            "cutoff_angstrom": self.cutoff_angstrom,
            "cutoff_width_angstrom": self.width_angstrom,
            "units": {"A": "eV", "B": "eV", "phi": "1 (sum of weights)"},
            "loss": "H_s(phi) = A_s . phi + 1/2 phi . B_s . phi",
            "coefficients": {s: {"A": self.A[i].tolist(), "B": self.B[i].tolist()} for i, s in enumerate(self.species)},
            "metrics": self.metrics,
            "provenance": {**self.provenance, "ensemble_version": __version__},
        }

    def save(self, path: str | Path) -> Path:
        """Write as JSON, atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(json.dumps(self.to_json(), indent=1, allow_nan=True))
        tmp.replace(path)
        return path

    @classmethod
    def from_json(cls, d: dict, source: str = "<model>") -> "Model":
        def need(key):
            if key not in d:
                raise ModelError(f"{source}: missing field {key!r}")
            return d[key]

        if need("format") != FORMAT:
            raise ModelError(f"{source}: format {d['format']!r}; expected {FORMAT!r}")
        species = tuple(str(s) for s in need("species"))
        masses = need("masses_amu")
        coefs = need("coefficients")
        try:
            weights = WeightSet.from_json(need("weight_functions"))
        except ValueError as exc:
            raise ModelError(f"{source}: {exc}") from None
        for s in species:
            if s not in masses or s not in coefs:
                raise ModelError(f"{source}: species {s!r} has no mass or no coefficients")
        mode = need("neighbour_mode")
        cutoff = d.get("cutoff_angstrom")
        if mode not in ("paper", "cutoff") or (mode == "cutoff") != (cutoff is not None):
            raise ModelError(f"{source}: neighbour_mode {mode!r} with cutoff_angstrom {cutoff!r} is inconsistent")
        try:
            a = tuple(np.asarray(coefs[s]["A"], dtype=float) for s in species)
            b = tuple(np.asarray(coefs[s]["B"], dtype=float) for s in species)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{source}: coefficients must be {{species: {{'A': [...], 'B': [[...]]}}}}: {exc}") from None
        for arr in a + b:
            if not np.isfinite(arr).all():
                raise ModelError(f"{source}: non-finite coefficient")
        try:
            return cls(kind=need("kind"), species=species, masses=tuple(float(masses[s]) for s in species),
                       weights=weights, A=a, B=b, cutoff_angstrom=None if cutoff is None else float(cutoff),
                       width_angstrom=float(d.get("cutoff_width_angstrom", 1.0)), metrics=d.get("metrics", {}),
                       provenance=d.get("provenance", {}))
        except ModelError as exc:
            raise ModelError(f"{source}: {exc}") from None


def load_model(path: str | Path) -> Model:
    """Read a model JSON file; malformed files give a ModelError naming the file and field."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not JSON ({exc})") from None
    if not isinstance(d, dict):
        raise ModelError(f"{path}: expected a JSON object")
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


