"""Multiple time stepping (r-RESPA) with the model split in two: its stiff short-range part on a
short step, the rest on the long one.

Tuckerman, Berne & Martyna, J. Chem. Phys. 97, 1990 (1992). For H = K + V_fast + V_slow the
symmetric splitting, with delta = h / n,

    kick(V_slow, h/2) [kick(V_fast, delta/2) drift(delta) kick(V_fast, delta/2)]^n kick(V_slow, h/2)

is a composition of exact Hamiltonian flows, so it is symplectic and time-reversible for any fixed
split, and its shadow energy stays close to the full H = K + V (V = V_fast + V_slow) as long as
the long step is stable. n = 1 is velocity Verlet with V.

The split is learned from the model itself; V_slow = V - V_fast always. Two kinds:

``distance`` (the default, :func:`short_range_split`)
    V_fast is the same model with every radial function (pair weights and angular radials) cut off
    smoothly at ``split_angstrom`` (by default 4 Å or where the model's own switch begins, if that
    is shorter; switched off over its outer half) instead of at the model's cutoff, the prior
    included:

        V_fast(q) = sum_k H_{s_k}(x_k^short(q) + c_{s_k}),    c_s = mean over atoms of s of (x_k - x_k^short),

    with c the mean environment beyond the split at the run's first frame (folded into the linear
    coefficients: H(x + c) = H(x) + (B c) . x + const). Covalent bonds, short hydrogen bonds and a
    proton shared between two oxygens all lie inside the split, so nothing about molecules is
    assumed: reactive water is split as well as intact water. The fast part is then a sizeable
    fraction of the model (half of a force evaluation at 4 Å for the cutoff-5 model), so the gain is
    smaller than with the molecules.
``molecules`` (:func:`intramolecular_split`)
    V_fast is the model's energy over the pairs inside each molecule only (bonded clusters of the
    first frame, fixed for the run), features offset by the same mean environment. Cheaper (a few
    hundred pairs: about 3x the simulated ps per second of Verlet at 2 fs), but a proton that leaves its
    molecule, or a hydrogen bond shortened towards transfer, is left to the long step: it holds for
    the pair models of intact water and fails for the many-body demo model within 0.3 ps at 2 fs
    (the README gives the measurements).

Either split is computed once from the run's initial state and then fixed: V_fast is one smooth
function of the positions for the whole run, so the map stays exactly symplectic, and a resumed
run rebuilds the same split from the same initial state.

Resonance bounds the long step: V_slow still moves with the O-H stretch (period ~9 fs), and
impulse splittings become unstable near a third to a half of the fastest period it sees. On water
the long step is stable at 2 fs and fails at 3 fs and beyond.

Units: Å, fs, amu, eV (forces eV/Å).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..invariants import pairs_within, species_index
from .action_kernels import find_clusters
from .integrators import ForceFn, MDState, _accel

__all__ = ["SPLITS", "IntramolecularSplit", "intramolecular_split", "ShortRangeSplit", "short_range_split",
           "fast_force_fn", "respa", "default_inner_steps"]

#: kinds of split (see the module docstring)
SPLITS = ("distance", "molecules")

#: the short step the fast part is integrated with by default (fs): velocity Verlet's step for
#: water. 1 fs holds for pair models with the distance split, not for the many-body demo model
#: (its short hydrogen bonds and prior lie in the fast part)
INNER_STEP_FS = {"distance": 0.5, "molecules": 0.5}

#: the distance split's default: at most 4 Å, switched off over its outer half. A switch narrower
#: than ~1.5 Å heats 10 ps runs at 2 fs (0.7 meV/atom/ps at 3.0 / 0.6 Å with the cutoff-5 model)
MAX_SPLIT_ANGSTROM = 4.0


def default_inner_steps(dt_fs: float, split: str = "distance") -> int:
    """Inner steps per long step: the fewest that keep the short step at or below
    :data:`INNER_STEP_FS` of the split."""
    return max(1, int(np.ceil(float(dt_fs) / INNER_STEP_FS[split] - 1e-9)))


def _species_mean(env: np.ndarray, codes: np.ndarray, n_species: int) -> np.ndarray:
    """(S, F): per species the mean over its atoms of ``env`` (N, F); zero for an absent species."""
    return np.stack([env[codes == s].mean(axis=0) if (codes == s).any() else np.zeros(env.shape[1])
                     for s in range(n_species)])


@dataclass(frozen=True)
class ShortRangeSplit:
    """The fast part of the distance split: the model cut off at ``split_angstrom`` (switched off over
    ``width_angstrom``), its linear coefficients shifted by the mean environment beyond it."""

    fast_model: object
    split_angstrom: float
    width_angstrom: float


def short_range_split(model, positions, box, species, split_angstrom: float | None = None,
                      width_angstrom: float | None = None) -> ShortRangeSplit:
    """The model with every radial function cut off at ``split_angstrom`` instead of its own cutoff
    (prior kept) and A_s + B_s c_s for A_s, c_s the species mean of x - x^short at ``positions``.

    The split must lie inside the region where the model's own cutoff switches are still 1
    (split <= cutoff - width, pair and angular alike), so that V_fast is the model's radial functions
    times one smooth switch and nothing else. Default: the largest such split up to
    :data:`MAX_SPLIT_ANGSTROM` (4 Å for the cutoff-5 model, 3.5 Å for the many-body demo model),
    switched off over its outer half (``width_angstrom`` = split / 2)."""
    if model.kind != "conservative":
        raise ValueError(f"a split of the energy needs a conservative model; this one is {model.kind!r}")
    limits = []
    if model.cutoff_angstrom is not None:
        limits.append(("pair", model.cutoff_angstrom - model.width_angstrom))
    if model.angular is not None:
        limits.append(("angular", model.angular.cutoff_angstrom - model.angular.cutoff_width_angstrom))
    rs = min([MAX_SPLIT_ANGSTROM] + [lim for _, lim in limits]) if split_angstrom is None else float(split_angstrom)
    ws = 0.5 * rs if width_angstrom is None else float(width_angstrom)
    if not (np.isfinite(rs) and np.isfinite(ws) and 0 < ws <= rs):
        raise ValueError(f"split_angstrom and width_angstrom must be finite with 0 < width <= split, got {rs}, {ws}")
    for name, lim in limits:
        if rs > lim + 1e-12:
            raise ValueError(f"split at {rs:g} Å lies beyond where the model's {name} cutoff starts to switch off "
                             f"({lim:g} Å); choose split_angstrom <= {lim:g}")
    short = replace(model, cutoff_angstrom=rs, width_angstrom=ws,
                    angular=None if model.angular is None else replace(model.angular, cutoff_angstrom=rs,
                                                                       cutoff_width_angstrom=ws))
    pos = np.ascontiguousarray(positions, dtype=float)
    codes, _ = species_index(species, list(model.species))
    env = model.features(pos, box, species) - short.features(pos, box, species)
    c = _species_mean(env, codes, len(model.species))
    a = tuple(np.asarray(model.A[s], float) + np.asarray(model.B[s], float) @ c[s] for s in range(len(model.species)))
    return ShortRangeSplit(replace(short, A=a), rs, ws)


@dataclass(frozen=True)
class IntramolecularSplit:
    """The fast part of the split: pairs (k < i) inside bonded clusters and the per-atom feature
    offsets (N, F) (each atom's species mean of x - x^intra at the first frame)."""

    pairs: np.ndarray
    feature_shift: np.ndarray
    clusters: int
    bond_angstrom: float


def intramolecular_split(model, positions, box, species, bond_angstrom: float = 1.3) -> IntramolecularSplit:
    """Every pair inside the bonded clusters of ``positions`` (atoms closer than ``bond_angstrom``
    joined, minimum image) and the species-mean environment offsets of the features."""
    if not (np.isfinite(bond_angstrom) and bond_angstrom > 0):
        raise ValueError(f"bond_angstrom must be a positive length, got {bond_angstrom!r}")
    pos = np.ascontiguousarray(positions, dtype=float)
    bx = np.asarray(box, float)
    members, offsets, _ = find_clusters(pos, bx, pairs_within(pos, bx, bond_angstrom), bond_angstrom)
    pairs = []
    for c in range(len(offsets) - 1):
        at = members[offsets[c]:offsets[c + 1]]              # ascending, so a < b gives k < i
        pairs += [(at[a], at[b]) for a in range(len(at)) for b in range(a + 1, len(at))]
    pairs = np.array(sorted(pairs), np.int64).reshape(-1, 2)
    codes, _ = species_index(species, list(model.species))
    env = model.features(pos, bx, species) - model.features_over(pos, bx, species, pairs)
    shift = _species_mean(env, codes, len(model.species))[codes]
    return IntramolecularSplit(pairs, shift, len(offsets) - 1, float(bond_angstrom))


def fast_force_fn(model, positions, box, species, split: str = "distance", *, split_angstrom: float | None = None,
                  bond_angstrom: float = 1.3):
    """The force function of V_fast for ``split`` at ``positions`` (what :func:`respa` takes as
    ``fast_fn``; energies not evaluated for the molecules split) and the settings that fix it."""
    if split not in SPLITS:
        raise ValueError(f"respa split {split!r}; expected one of {SPLITS}")
    if split == "distance":
        cut = short_range_split(model, positions, box, species, split_angstrom)
        return (cut.fast_model.force_fn(box, species),
                {"split": split, "split_angstrom": cut.split_angstrom, "split_width_angstrom": cut.width_angstrom})
    if split_angstrom is not None:
        raise ValueError("split_angstrom applies to the distance split")
    cut = intramolecular_split(model, positions, box, species, bond_angstrom)
    return (model.restricted_force_fn(box, species, cut.pairs, cut.feature_shift, with_energy=False),
            {"split": split, "bond_angstrom": float(bond_angstrom)})


def respa(force_fn: ForceFn, fast_fn: ForceFn, dt_fs: float, n_inner: int, masses):
    """NVE r-RESPA: ``force_fn`` the full forces (and energy), ``fast_fn`` those of V_fast; the slow
    force is their difference. Returns (init_fn, step_fn) like
    :func:`ensemble.md.integrators.velocity_verlet`; states carry the full forces and energy (the
    fast forces at the current positions ride in ``aux``, recomputed on resume: same numbers)."""
    masses = np.asarray(masses, dtype=float)
    h = float(dt_fs)
    if not (np.isfinite(h) and h > 0):
        raise ValueError(f"dt_fs must be a positive time, got {dt_fs!r}")
    if not (isinstance(n_inner, (int, np.integer)) and not isinstance(n_inner, bool) and n_inner >= 1):
        raise ValueError(f"inner steps must be an integer >= 1, got {n_inner!r}")
    n = int(n_inner)
    delta = h / n

    def init_fn(positions, velocities) -> MDState:
        q = np.array(positions, float)
        f, e = force_fn(q)
        ff, _ = fast_fn(q)
        return MDState(q, np.array(velocities, float), f, e, 0, None, 0, {"fast_forces": ff})

    def step_fn(state: MDState) -> MDState:
        ff = state.aux["fast_forces"]
        v = state.velocities + 0.5 * h * _accel(state.forces - ff, masses)
        q = state.positions
        for _ in range(n):
            v = v + 0.5 * delta * _accel(ff, masses)
            q = q + delta * v
            ff, _ = fast_fn(q)
            v = v + 0.5 * delta * _accel(ff, masses)
        f, e = force_fn(q)
        v = v + 0.5 * h * _accel(f - ff, masses)
        return replace(state, positions=q, velocities=v, forces=f, potential_energy=e, step=state.step + 1,
                       aux={"fast_forces": ff})

    return init_fn, step_fn
