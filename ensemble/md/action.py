"""A long-time-step map derived from a learned action (a midpoint generating function).

With x = (q, p) and the midpoint x_bar = (x + x') / 2, a scalar S(q_bar, p_bar) defines the map

    q' = q + dS/dp_bar,        p' = p - dS/dq_bar,

symplectic for any smooth S and time-reversible when S is even in p_bar (flip the momenta of
x', apply the map, flip again: back at x). Here

    S = h K(p_bar) + h V(q_bar) + h^3 sum_c a_c T_c(q_bar, v_bar),     v_bar = M^-1 p_bar,

with V a fitted conservative model, K the kinetic energy and T_c pair features even in the
velocities (:mod:`ensemble.md.action_kernels`): the terms of the modified Hamiltonian of a
midpoint step. To O(h^3) the exact flow of H = K + V has S = h H + h^3 / 24 (V''[v, v] +
F^T M^-1 F); the coefficients a_c are fitted (:mod:`ensemble.fit.action`) to pairs of states a
long step apart, so they also carry the higher orders. a = 0 is the implicit midpoint rule.

The implicit equations are solved by a fixed point: a Newton-like correction whose matrix holds
the stiff part of the problem exactly (the Hessian blocks of V and of the learned terms within
bonded clusters - for water, the molecules), accelerated by Anderson mixing, started from a
prediction linearised around the previous step's midpoint (no extra force evaluation). It stops
at a tolerance (Å) or an iteration cap; the iteration count of every step is recorded.

:func:`action_integrator` and :func:`direct_integrator` (the baseline: q', p' linear in the same
features at x, no structure) return ``(init_fn, step_fn)`` like
:func:`ensemble.md.integrators.velocity_verlet`; :func:`ensemble.md.integrators.thermostatted`
wraps them in a Nosé-Hoover chain.

Units: Å, fs, amu, eV; inside the map, energies in amu Å^2/fs^2 (eV x c, c = 1/103.64...).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import UserError
from ..invariants import VerletList, neighbour_pairs
from ..model import Model, forces_from_pair_terms, pair_terms
from ..units import EV_PER_ANGSTROM_AMU_TO_ANGSTROM_PER_FS2 as EV_TO_INTERNAL
from .action_kernels import (_block_offsets, apply_newton, feature_cluster_hessians, find_clusters,
                             model_cluster_hessian, newton_blocks, pair_feature_gradients, pair_features)
from .integrators import MDState
from .simulate import SimulationError

__all__ = ["PairFeatures", "BoundFeatures", "ActionModel", "ActionModelError", "ActionDivergence", "ModelPotential", "load_action",
           "action_integrator", "direct_integrator", "default_features", "file_sha256", "FORMAT"]

FORMAT = "ensemble.action/1"
KINDS = ("action", "direct")


class ActionModelError(UserError, ValueError):
    """An action model file is malformed or does not fit the model / system it is applied to."""


class ActionDivergence(SimulationError):
    """The fixed point of the long-step map failed (diverged, or a singular Newton matrix)."""


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- features
_RADIAL_KINDS = {"exp": 0, "gauss": 1, "power": 2, "shell": 3}


@dataclass(frozen=True)
class PairFeatures:
    """The learned terms T_c: pair features of radial functions u_m (times a C^3 switch to 0 at
    ``cutoff_angstrom``), per unordered species pair; families ``K`` (directional second
    derivatives along the velocities) and ``F`` (products of radial derivatives / reduced mass;
    ``f_products`` ``diagonal``: u_m'^2 only, ``all``: every u_m' u_n', m <= n).

    ``radial``: ((kind, param, sigma), ...) with kind ``exp`` (exp(-param r)), ``gauss``
    (exp(-r^2 / 2 param^2)), ``power`` (r^-param) - the invariants' weight functions - or
    ``shell`` (exp(-(r - param)^2 / 2 sigma^2), localised: well-conditioned fits).
    """

    species: tuple[str, ...]
    radial: tuple[tuple[str, float, float], ...]
    cutoff_angstrom: float = 2.6
    width_angstrom: float = 0.6
    families: tuple[str, ...] = ("K", "F")
    f_products: str = "diagonal"

    def __post_init__(self):
        if not set(self.families) <= {"K", "F"} or not self.families:
            raise ActionModelError(f"feature families must be a non-empty subset of ('K', 'F'), got {self.families}")
        if not 0 < self.width_angstrom <= self.cutoff_angstrom:
            raise ActionModelError(f"need 0 < width <= cutoff, got {self.width_angstrom}, {self.cutoff_angstrom}")
        if self.f_products not in ("diagonal", "all"):
            raise ActionModelError(f"f_products must be 'diagonal' or 'all', got {self.f_products!r}")
        if not self.radial:
            raise ActionModelError("at least one radial function is needed")
        for kind, param, sigma in self.radial:
            if kind not in _RADIAL_KINDS or not param > 0 or (kind == "shell" and not sigma > 0):
                raise ActionModelError(f"radial function ({kind!r}, {param}, {sigma}): kind must be one of "
                                       f"{sorted(_RADIAL_KINDS)} with param > 0 (and sigma > 0 for a shell)")

    @property
    def pair_types(self) -> list[tuple[str, str]]:
        s = self.species
        return [(s[a], s[b]) for a in range(len(s)) for b in range(a, len(s))]

    def type_table(self) -> np.ndarray:
        n = len(self.species)
        out = np.empty((n, n), np.int64)
        t = 0
        for a in range(n):
            for b in range(a, n):
                out[a, b] = out[b, a] = t
                t += 1
        return out

    def radial_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        kinds = np.array([_RADIAL_KINDS[k] for k, _, _ in self.radial], np.int64)
        return kinds, np.array([p for _, p, _ in self.radial], float), np.array([s for _, _, s in self.radial], float)

    def f_pairs(self) -> np.ndarray:
        m = len(self.radial)
        if "F" not in self.families:
            return np.zeros((0, 2), np.int64)
        if self.f_products == "diagonal":
            return np.repeat(np.arange(m, dtype=np.int64)[:, None], 2, axis=1)
        return np.ascontiguousarray(np.array(np.triu_indices(m), dtype=np.int64).T)

    @property
    def n_k(self) -> int:
        return len(self.pair_types) * len(self.radial) if "K" in self.families else 0

    @property
    def n_f(self) -> int:
        return len(self.pair_types) * len(self.f_pairs())

    @property
    def n_features(self) -> int:
        return self.n_k + self.n_f

    @property
    def radial_labels(self) -> list[str]:
        out = []
        for kind, p, sg in self.radial:
            out.append(f"shell({p:g}, {sg:g})" if kind == "shell" else f"{kind}({p:g})")
        return out

    @property
    def labels(self) -> list[str]:
        wl = self.radial_labels
        out = [f"K[{a}-{b}, {w}]" for a, b in self.pair_types for w in wl] if "K" in self.families else []
        out += [f"F[{a}-{b}, {wl[m]} x {wl[n]}]" for a, b in self.pair_types for m, n in self.f_pairs()]
        return out

    def split(self, coef: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(a_k (types, M), a_f (types, n_fp)) from a coefficient vector."""
        coef = np.asarray(coef, float)
        nt, m = len(self.pair_types), len(self.radial)
        a_k = coef[:self.n_k].reshape(nt, m) if self.n_k else np.zeros((nt, m))
        a_f = coef[self.n_k:].reshape(nt, -1) if self.n_f else np.zeros((nt, 0))
        return np.ascontiguousarray(a_k), np.ascontiguousarray(a_f)

    def bind(self, species, masses, box, skin_angstrom: float = 0.5) -> "BoundFeatures":
        return BoundFeatures(self, species, masses, box, skin_angstrom)

    def to_json(self) -> dict:
        return {"species": list(self.species),
                "radial": [{"kind": k, "param": p, **({"sigma": sg} if k == "shell" else {})}
                           for k, p, sg in self.radial],
                "cutoff_angstrom": self.cutoff_angstrom, "width_angstrom": self.width_angstrom,
                "families": list(self.families), "f_products": self.f_products, "labels": self.labels}

    @classmethod
    def from_json(cls, d: dict) -> "PairFeatures":
        radial = tuple((str(r["kind"]), float(r["param"]), float(r.get("sigma", 0.0))) for r in d["radial"])
        return cls(tuple(d["species"]), radial, float(d["cutoff_angstrom"]), float(d["width_angstrom"]),
                   tuple(d["families"]), str(d.get("f_products", "diagonal")))


def default_features(species, cutoff_angstrom: float = 2.6) -> PairFeatures:
    """Gaussian shells every 0.1 Å from 0.8 to 2.2 Å: covalent bonds (~1 Å), the H-H distance of
    a molecule (~1.6 Å) and hydrogen bonds (1.6-2.2 Å) each get their own coefficients; the
    switch removes everything beyond ``cutoff_angstrom``."""
    centres = np.round(np.arange(0.8, 2.21, 0.1), 3)
    return PairFeatures(tuple(species), tuple(("shell", float(c), 0.1) for c in centres), cutoff_angstrom, 0.6)


class BoundFeatures:
    """:class:`PairFeatures` bound to a system (species, masses, box), with its own Verlet list."""

    def __init__(self, spec: PairFeatures, species, masses, box, skin_angstrom: float = 0.5):
        labels = [str(s) for s in species]
        unknown = sorted(set(labels) - set(spec.species))
        if unknown:
            raise ActionModelError(f"species {unknown} have no pair features (the action model knows {spec.species})")
        self.spec = spec
        self.codes = np.array([spec.species.index(s) for s in labels], np.int64)
        self.type_of = spec.type_table()
        self.inv_mass = 1.0 / np.asarray(masses, float)
        self.box = np.asarray(box, float)
        if spec.cutoff_angstrom > 0.5 * float(self.box.min()):
            raise ActionModelError(f"feature cutoff {spec.cutoff_angstrom} Å exceeds half the box "
                                   f"({0.5 * float(self.box.min()):.3f} Å)")
        self.kinds, self.params, self.sigmas = spec.radial_arrays()
        self.f_pairs = spec.f_pairs()
        self.n_features = spec.n_features
        self.verlet = VerletList(self.box, spec.cutoff_angstrom, skin_angstrom)
        self.n_types = len(spec.pair_types)

    def columns(self, pos, vel):
        """T (C,), dT/dq (C, N, 3), dT/dv (C, N, 3) at one point."""
        pos = np.ascontiguousarray(pos, float)
        s = self.spec
        return pair_features(pos, np.ascontiguousarray(vel, float), self.box, self.codes, self.type_of, self.n_types,
                             self.kinds, self.params, self.sigmas, s.cutoff_angstrom, s.width_angstrom, self.inv_mass,
                             self.verlet(pos), "K" in s.families, self.f_pairs)

    def gradients(self, pos, vel, a_k, a_f):
        """sum_c a_c dT_c/dq, sum_c a_c dT_c/dv (N, 3) and sum_c a_c T_c."""
        pos = np.ascontiguousarray(pos, float)
        s = self.spec
        return pair_feature_gradients(pos, np.ascontiguousarray(vel, float), self.box, self.codes, self.type_of,
                                      self.kinds, self.params, self.sigmas, s.cutoff_angstrom, s.width_angstrom,
                                      self.inv_mass, self.verlet(pos), a_k, self.f_pairs, a_f)

    def cluster_hessians(self, pos, vel, a_k, a_f, members, offsets, cluster_of):
        pos = np.ascontiguousarray(pos, float)
        s = self.spec
        return feature_cluster_hessians(pos, np.ascontiguousarray(vel, float), self.box, self.codes, self.type_of,
                                        self.kinds, self.params, self.sigmas, s.cutoff_angstrom, s.width_angstrom,
                                        self.inv_mass, self.verlet(pos), a_k, self.f_pairs, a_f, members, offsets,
                                        cluster_of)


# --------------------------------------------------------------------------- the potential V
class ModelPotential:
    """V from a conservative :class:`~ensemble.model.Model`: forces and energy (the model's own
    kernels, as ``Model.force_fn`` uses them), and the cluster blocks of its Hessian for the
    fixed point's Newton matrix. The invariants of the last evaluation are kept: the Hessian at
    the previous midpoint needs no extra pass over the pairs.

    Any object with ``forces(pos) -> (forces eV/Å, energy eV)`` can serve as V; without
    ``cluster_hessian`` the fixed point has only the kinetic part in its Newton matrix (slow for
    stiff systems at long steps).
    """

    def __init__(self, model: Model, box, species, skin_angstrom: float = 1.0):
        if model.kind != "conservative":
            raise ActionModelError(f"the action integrator needs a conservative model (one energy V); got kind "
                                   f"{model.kind!r}")
        self.model = model
        self.box = np.asarray(box, float)
        self.codes, self.cutoff, self.width, self.kinds, self.params = model._setup(np.asarray(species), self.box)
        self.n_species = len(model.species)
        self.b_mat = np.ascontiguousarray(np.stack(model.B))
        self._fn = model.force_fn(self.box, np.asarray(species), skin_angstrom)
        self.verlet = self._fn.neighbours
        self.last = None          # (positions, pairs, dh) of the last evaluation
        self.evaluations = 0

    def _energy(self, phi):
        e = 0.0
        for s in range(self.n_species):
            at = self.codes == s
            e += float(np.sum(phi[at] @ self.model.A[s]) + 0.5 * np.sum((phi[at] @ self.model.B[s]) * phi[at]))
        return e

    def forces(self, pos):
        """(forces eV/Å (N, 3), energy eV); identical to ``Model.force_fn`` in cutoff mode."""
        self.evaluations += 1
        pos = np.ascontiguousarray(pos, float)
        if self.verlet is None:                       # paper mode: the model's own path
            f, e = self._fn(pos)
            self.last = (pos.copy(), None, None)
            return f, e
        pairs = self.verlet(pos)
        phi, g, d = pair_terms(pos, self.box, self.codes, self.n_species, self.kinds, self.params, self.cutoff,
                               self.width, pairs)
        dh = self.model.dh_dphi(phi, self.codes)
        self.last = (pos.copy(), pairs, dh)
        return forces_from_pair_terms(pairs, self.codes, len(self.kinds), dh, g, d, True), self._energy(phi)

    def cluster_hessian(self, pos, members, offsets, cluster_of, r_short):
        """Cluster blocks (eV/Å^2) of the Hessian at ``pos`` (see :func:`model_cluster_hessian`)."""
        pos = np.ascontiguousarray(pos, float)
        if self.last is not None and self.last[1] is not None and np.array_equal(self.last[0], pos):
            _, pairs, dh = self.last
        else:
            pairs = self.verlet(pos) if self.verlet is not None else neighbour_pairs(pos, self.box, -1.0)
            phi, _, _ = pair_terms(pos, self.box, self.codes, self.n_species, self.kinds, self.params, self.cutoff,
                                   self.width, pairs)
            dh = self.model.dh_dphi(phi, self.codes)
        return model_cluster_hessian(pos, self.box, self.codes, self.n_species, self.kinds, self.params, self.cutoff,
                                     self.width, pairs, dh, self.b_mat, members, offsets, cluster_of, r_short)


# --------------------------------------------------------------------------- the learned map
@dataclass(frozen=True)
class ActionModel:
    """A fitted long-step map.

    ``kind`` ``action``: S = h K + h V + h^3 sum_c coef[c] T_c (coef in amu Å^2/fs^4 per unit of
    T_c). ``direct``: the baseline without structure, q' = q + h v + h^2/2 cq[0] a +
    h^3 sum_c cq[c+1] M^-1 dT_c/dv, v' = v + h cv[0] a - h^3 sum_c cv[c+1] M^-1 dT_c/dq at the
    start of the step (a = F / m); ``coef`` holds [cq, cv].
    ``potential`` names the conservative model it belongs to (path, sha256).
    """

    kind: str
    dt_fs: float
    features: PairFeatures
    coef: np.ndarray
    potential: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ActionModelError(f"action model kind {self.kind!r}; expected one of {KINDS}")
        if not self.dt_fs > 0:
            raise ActionModelError(f"dt_fs must be > 0, got {self.dt_fs}")
        want = self.features.n_features * (1 if self.kind == "action" else 2) + (0 if self.kind == "action" else 2)
        if np.shape(self.coef) != (want,):
            raise ActionModelError(f"{self.kind} model with {self.features.n_features} features needs {want} "
                                   f"coefficients, got {np.shape(self.coef)}")
        if not np.isfinite(self.coef).all():
            raise ActionModelError("non-finite coefficient")

    def direct_parts(self) -> tuple[np.ndarray, np.ndarray]:
        c = self.features.n_features + 1
        return self.coef[:c], self.coef[c:]

    def check_potential(self, model_path: str | Path | None) -> None:
        """Refuse a conservative model other than the one this map was fitted with (by sha256)."""
        want = self.potential.get("sha256")
        if model_path is None or want is None:
            return
        got = file_sha256(model_path)
        if got != want:
            raise ActionModelError(f"{model_path}: sha256 {got[:12]}... differs from the model this {self.kind} map "
                                   f"was fitted with ({self.potential.get('path')}, {want[:12]}...)")

    def to_json(self) -> dict:
        return {"format": FORMAT, "kind": self.kind, "dt_fs": self.dt_fs,
                "action": ("S = h K(p_bar) + h V(q_bar) + h^3 sum_c coef[c] T_c(q_bar, v_bar)" if self.kind == "action"
                           else "direct: q' = q + h v + h^2/2 cq[0] a + h^3 sum cq[c+1] M^-1 dT_c/dv; "
                                "v' = v + h cv[0] a - h^3 sum cv[c+1] M^-1 dT_c/dq at the start"),
                "units": {"coef": "amu Å^2 fs^-4 per unit of T_c (internal energy unit amu Å^2/fs^2 = 103.64 eV)",
                          "K": "1/fs^2", "F": "1/(Å^2 amu)"},
                "features": self.features.to_json(), "coefficients": self.coef.tolist(),
                "potential": self.potential, "metrics": self.metrics,
                "provenance": {**self.provenance, "ensemble_version": __version__}}

    def save(self, path: str | Path) -> Path:
        from ..io.store import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_json(), indent=1, allow_nan=True) + "\n")

    @classmethod
    def from_json(cls, d: dict, source: str = "<action model>") -> "ActionModel":
        if not isinstance(d, dict):
            raise ActionModelError(f"{source}: expected a JSON object (an action model), got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ActionModelError(f"{source}: format {d.get('format')!r}; expected {FORMAT!r}")
        try:
            return cls(kind=d["kind"], dt_fs=float(d["dt_fs"]), features=PairFeatures.from_json(d["features"]),
                       coef=np.asarray(d["coefficients"], float), potential=d.get("potential", {}),
                       metrics=d.get("metrics", {}), provenance=d.get("provenance", {}))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, ActionModelError):
                raise ActionModelError(f"{source}: {exc}") from None
            raise ActionModelError(f"{source}: malformed action model ({type(exc).__name__}: {exc})") from None


def load_action(path: str | Path) -> ActionModel:
    path = Path(path)
    if not path.is_file():
        raise ActionModelError(f"{path}: no such action model file")
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ActionModelError(f"{path}: not a UTF-8 text file (an action model is the JSON file "
                               "`ensemble fit-action` writes)") from None
    except json.JSONDecodeError as exc:
        raise ActionModelError(f"{path}: not JSON ({exc})") from None
    return ActionModel.from_json(d, str(path))


# --------------------------------------------------------------------------- the integrators
def _anderson(zs, gs, m):
    """Anderson (type II) update from histories of iterates z and steps g = G(z) - z."""
    z, g = zs[-1], gs[-1]
    if m == 0 or len(zs) < 2:
        return z + g
    dz = np.diff(np.array(zs[-(m + 1):]), axis=0).T
    dg = np.diff(np.array(gs[-(m + 1):]), axis=0).T
    gamma, *_ = np.linalg.lstsq(dg, g, rcond=None)
    return z + g - (dz + dg) @ gamma


def action_integrator(potential, action: ActionModel, masses, species, box, *, tol_angstrom: float = 1e-9,
                      max_iter: int = 30, anderson: int = 4, bond_angstrom: float = 1.3,
                      hessian_cutoff_angstrom: float = 3.0, energy_every: int = 1, coef=None, trace: list | None = None,
                      max_move_angstrom: float = 0.2, fail_angstrom: float = 1e-4):
    """NVE long steps of the learned action: ``(init_fn, step_fn)`` like velocity Verlet.

    ``potential`` provides ``forces(pos) -> (eV/Å, eV)`` (and ``cluster_hessian`` for a fast
    fixed point: :class:`ModelPotential`). ``tol_angstrom``: the fixed point stops when the
    midpoint equations hold to this many Å in positions and in (h/2) x velocities;
    ``max_iter`` caps the iterations (the step is then taken with the residual reached, which
    the state records). ``energy_every``: forces and V at the end of a step (one more force
    evaluation) every that many steps, NaN between. ``coef`` overrides the fitted coefficients
    (zeros: the implicit midpoint rule). ``trace``: a list that receives (step, iteration,
    residual) of every iteration. Safeguards: an iterate whose residual is not the best so far is
    replaced by a damped Newton step from the best one; no update moves an atom by more than
    ``max_move_angstrom``; a step that ends with a residual above ``fail_angstrom`` raises
    :class:`ActionDivergence` (a :class:`~ensemble.md.simulate.SimulationError`).

    The state's ``aux`` holds what the next step's prediction needs (the last midpoint and the
    gradients there) and the last step's ``iterations`` and ``residual_angstrom``.
    """
    if action.kind != "action":
        raise ActionModelError(f"action_integrator needs an 'action' model, got {action.kind!r}")
    masses = np.asarray(masses, float)
    inv_m = 1.0 / masses
    h = float(action.dt_fs)
    half = 0.5 * h
    feats = action.features.bind(species, masses, box)
    a_k, a_f = action.features.split(action.coef if coef is None else np.asarray(coef, float))
    learned = bool(np.any(a_k) or np.any(a_f))
    has_hess = hasattr(potential, "cluster_hessian")
    box = np.asarray(box, float)
    bonds = VerletList(box, bond_angstrom, 0.5)

    def terms(q, v):
        """V's force (internal units amu Å/fs^2), V (eV), and the learned gradients."""
        f, e = potential.forces(q)
        if learned:
            gq, gv, _ = feats.gradients(q, v, a_k, a_f)
        else:
            gq = gv = np.zeros_like(q)
        return f, e, gq, gv

    def residual(q, v, qb, vb, f, gq, gv):
        rq = qb - q - half * (vb + h * h * inv_m[:, None] * gv)
        rv = vb - v - half * inv_m[:, None] * (f * EV_TO_INTERNAL - h * h * gq)
        return rq, rv

    def preconditioner(qb, vb):
        """The Newton matrix's inverse, cluster by cluster, at (qb, vb)."""
        members, offsets, cluster_of = find_clusters(qb, box, bonds(qb), bond_angstrom)
        if has_hess:
            hq, boff = potential.cluster_hessian(qb, members, offsets, cluster_of, hessian_cutoff_angstrom)
            hq = hq * EV_TO_INTERNAL
        else:
            boff = _block_offsets(offsets)
            hq = np.zeros(boff[-1])
        if learned:
            tqq, tvq, tvv, _ = feats.cluster_hessians(qb, vb, a_k, a_f, members, offsets, cluster_of)
        else:
            tqq = tvq = tvv = np.zeros_like(hq)
        try:
            inv = newton_blocks(hq, tqq, tvq, tvv, boff, members, offsets, inv_m, h)
        except np.linalg.LinAlgError:
            raise ActionDivergence("the Newton matrix of the midpoint equations is singular in a cluster: the "
                                   "learned action is degenerate at this state") from None
        return inv, boff, members, offsets

    def correction(pc, rq, rv):
        inv, boff, members, offsets = pc
        return apply_newton(inv, boff, members, offsets, rq, rv)

    def endpoint(state, q1, v1):
        if (state.step + 1) % energy_every == 0:
            f1, e1 = potential.forces(q1)
            return f1, e1
        return state.forces, float("nan")

    def init_fn(positions, velocities) -> MDState:
        q = np.array(positions, float)
        v = np.array(velocities, float)
        f, e, gq, gv = terms(q, v)
        aux = {"qbar": q.copy(), "vbar": v.copy(), "fbar": f, "gq": gq, "gv": gv, "iterations": 0,
               "residual_angstrom": 0.0}
        return MDState(q, v, f, e, 0, None, 0, aux)

    def step_fn(state: MDState) -> MDState:
        q, v = state.positions, state.velocities
        ax = state.aux
        # the Newton matrix at the last midpoint (kept from the step before, or rebuilt: same numbers)
        pc = ax.get("preconditioner") or preconditioner(ax["qbar"], ax["vbar"])
        # prediction: one Newton step from the last midpoint, its gradients frozen (no evaluation)
        rq, rv = residual(q, v, ax["qbar"], ax["vbar"], ax["fbar"], ax["gq"], ax["gv"])
        dq, dv = correction(pc, rq, rv)
        qb, vb = ax["qbar"] + dq, ax["vbar"] + dv
        zs, gs = [], []
        its = 0
        n3 = q.size
        best = None                       # (residual, z, Newton step) of the best iterate so far
        damping = 1.0
        while True:
            f, _, gq, gv = terms(qb, vb)
            its += 1
            rq, rv = residual(q, v, qb, vb, f, gq, gv)
            err = max(float(np.abs(rq).max()), half * float(np.abs(rv).max()))
            if trace is not None:
                trace.append((state.step + 1, its, err))
            if err < tol_angstrom or its >= max_iter or not np.isfinite(err):
                break
            dq, dv = correction(pc, rq, rv)
            z_now = np.concatenate([qb.ravel(), half * vb.ravel()])
            g_now = np.concatenate([dq.ravel(), half * dv.ravel()])
            if best is None or err < best[0]:
                best = (err, z_now, g_now)
                zs.append(z_now)
                gs.append(g_now)
                if len(zs) > anderson + 1:
                    zs.pop(0)
                    gs.pop(0)
                z = _anderson(zs, gs, anderson)
            else:
                # no progress: forget the history, a shorter Newton step from the best iterate
                damping *= 0.5
                zs, gs = [], []
                z = best[1] + damping * best[2]
            step = z - z_now
            longest = float(np.abs(step[:n3]).max())
            if longest > max_move_angstrom:                # a trust region: no atom jumps
                z = z_now + step * (max_move_angstrom / longest)
            qb, vb = z[:n3].reshape(q.shape), z[n3:].reshape(q.shape) / half
        if not err < fail_angstrom:
            raise ActionDivergence(f"step {state.step + 1}: the fixed point of the {h:g} fs map did not converge "
                                   f"(residual {err:.3g} Å after {its} iterations)")
        # the step: x' = x + J grad S at the last midpoint (a final Picard step, free)
        q1 = q + h * vb + h ** 3 * inv_m[:, None] * gv
        v1 = v + h * inv_m[:, None] * (f * EV_TO_INTERNAL - h * h * gq)
        aux = {"qbar": qb, "vbar": vb, "fbar": f, "gq": gq, "gv": gv, "iterations": its, "residual_angstrom": err}
        if np.isfinite(err):
            aux["preconditioner"] = preconditioner(qb, vb)        # uses the invariants just evaluated at qb
        f1, e1 = endpoint(state, q1, v1)
        return replace(state, positions=q1, velocities=v1, forces=f1, potential_energy=e1, step=state.step + 1,
                       aux=aux)

    init_fn.aux_arrays = ("qbar", "vbar", "fbar", "gq", "gv")
    step_fn.potential = potential
    return init_fn, step_fn


def direct_integrator(potential, action: ActionModel, masses, species, box):
    """The baseline without structure: one explicit prediction per step from features at the
    start of the step (one force evaluation). Neither symplectic nor time-reversible."""
    if action.kind != "direct":
        raise ActionModelError(f"direct_integrator needs a 'direct' model, got {action.kind!r}")
    masses = np.asarray(masses, float)
    inv_m = 1.0 / masses
    h = float(action.dt_fs)
    feats = action.features.bind(species, masses, box)
    cq, cv = action.direct_parts()
    qk, qf = action.features.split(cq[1:])
    vk, vf = action.features.split(cv[1:])

    def init_fn(positions, velocities) -> MDState:
        q = np.array(positions, float)
        f, e = potential.forces(q)
        return MDState(q, np.array(velocities, float), f, e, 0, None, 0, {"iterations": 1, "residual_angstrom": 0.0})

    def step_fn(state: MDState) -> MDState:
        q, v, f = state.positions, state.velocities, state.forces
        acc = f * EV_TO_INTERNAL * inv_m[:, None]
        _, gv_q, _ = feats.gradients(q, v, qk, qf)
        gq_v, _, _ = feats.gradients(q, v, vk, vf)
        q1 = q + h * v + 0.5 * h * h * cq[0] * acc + h ** 3 * inv_m[:, None] * gv_q
        v1 = v + h * cv[0] * acc - h ** 3 * inv_m[:, None] * gq_v
        f1, e1 = potential.forces(q1)
        return replace(state, positions=q1, velocities=v1, forces=f1, potential_energy=e1, step=state.step + 1)

    init_fn.aux_arrays = ()
    return init_fn, step_fn
