"""A fixed short-range repulsion per species pair, acting only below the distances seen in training.

A model fitted to data has no say about distances it never saw: the cutoff conservative model
collapsed when an H came to 0.80 Å of its O, closer than any training pair. The prior is

    V_ab(r) = epsilon [exp(x) - 1 - x - x^2 / 2],   x = (r0_ab - r) / lambda,   for r < r0_ab,
    V_ab(r) = 0                                                                 for r >= r0_ab,

with r0_ab = (shortest a-b distance in the training frames) - margin. V, V' and V'' vanish at
r0 (smooth, C^2); below it V grows exponentially (with the defaults epsilon = 0.1 eV,
lambda = 0.05 Å, margin 0.05 Å: a force of 9 eV/Å 0.1 Å inside r0, 99 eV/Å 0.2 Å inside).
Because every training pair lies above r0, the prior adds nothing to the training forces; the
fit learns the remainder (targets minus prior forces) unchanged, while MD that strays below the
data is pushed back. Energy and forces are a pair sum, so both model kinds use them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from .invariants import neighbour_pairs, pair_geometry

__all__ = ["ShortRangePrior", "prior_energy_forces", "shortest_distances", "DEFAULT_MARGIN_ANGSTROM"]

DEFAULT_MARGIN_ANGSTROM = 0.05
DEFAULT_EPSILON_EV = 0.1
DEFAULT_DECAY_ANGSTROM = 0.05


@njit(cache=True)
def prior_energy_forces(pos, box, species, onset, epsilon, decay, pairs):
    """Energy (eV) and forces (N, 3) (eV/Å) of the prior over candidate pairs (k < i).

    ``onset`` (S, S) Å: r0 per species pair (<= 0: no prior for that pair)."""
    n = pos.shape[0]
    f = np.zeros((n, 3))
    e = 0.0
    for q in range(pairs.shape[0]):
        k = pairs[q, 0]
        i = pairs[q, 1]
        r0 = onset[species[k], species[i]]
        if r0 <= 0.0:
            continue
        inside, dx, dy, dz, r, fc, dfc = pair_geometry(k, i, pos, box, -1.0, 1.0)
        if r >= r0:
            continue
        x = (r0 - r) / decay
        ex = np.exp(x)
        e += epsilon * (ex - 1.0 - x - 0.5 * x * x)
        dv = -epsilon / decay * (ex - 1.0 - x)          # dV/dr < 0: repulsive
        s = -dv / r
        f[k, 0] += s * dx
        f[k, 1] += s * dy
        f[k, 2] += s * dz
        f[i, 0] -= s * dx
        f[i, 1] -= s * dy
        f[i, 2] -= s * dz
    return e, f


@njit(cache=True)
def _shortest(pos, box, species, n_species, pairs, out):
    for q in range(pairs.shape[0]):
        k = pairs[q, 0]
        i = pairs[q, 1]
        inside, dx, dy, dz, r, fc, dfc = pair_geometry(k, i, pos, box, -1.0, 1.0)
        a = species[k]
        b = species[i]
        if r < out[a, b]:
            out[a, b] = r
            out[b, a] = r


def shortest_distances(pos: np.ndarray, box: np.ndarray, codes: np.ndarray, n_species: int,
                       reach_angstrom: float = 5.0) -> np.ndarray:
    """Shortest minimum-image distance (Å) per species pair over frames: (S, S), inf where no pair of
    that kind came within ``reach_angstrom`` (capped at half the smallest box edge).

    pos (F, N, 3) Å, box (F, 3) Å."""
    out = np.full((n_species, n_species), np.inf)
    for t in range(pos.shape[0]):
        bx = np.asarray(box[t], float)
        rc = min(reach_angstrom, 0.5 * float(bx.min()))
        p = np.ascontiguousarray(pos[t], dtype=float)
        _shortest(p, bx, codes, n_species, neighbour_pairs(p, bx, rc), out)
    return out


@dataclass(frozen=True, eq=False)
class ShortRangePrior:
    """The prior of a model: onsets r0 (S, S) Å (<= 0 or absent: none), the shortest training
    distances they came from, the margin, epsilon (eV) and lambda (Å)."""

    species: tuple[str, ...]
    shortest_angstrom: np.ndarray
    margin_angstrom: float = DEFAULT_MARGIN_ANGSTROM
    epsilon_ev: float = DEFAULT_EPSILON_EV
    decay_angstrom: float = DEFAULT_DECAY_ANGSTROM

    def __post_init__(self):
        d = np.asarray(self.shortest_angstrom, float)
        s = len(self.species)
        if d.shape != (s, s) or not np.allclose(d, d.T, equal_nan=True):
            raise ValueError(f"prior: shortest distances must be a symmetric {s}x{s} matrix, got shape {d.shape}")
        if not (self.epsilon_ev > 0 and self.decay_angstrom > 0 and self.margin_angstrom >= 0):
            raise ValueError(f"prior: need epsilon_ev > 0, decay_angstrom > 0, margin_angstrom >= 0; got "
                             f"{self.epsilon_ev}, {self.decay_angstrom}, {self.margin_angstrom}")
        object.__setattr__(self, "shortest_angstrom", d)

    @property
    def onset_angstrom(self) -> np.ndarray:
        """r0 per species pair; 0 (no prior) where no training pair was seen."""
        d = self.shortest_angstrom
        return np.where(np.isfinite(d), np.maximum(d - self.margin_angstrom, 0.0), 0.0)

    def energy_forces(self, pos: np.ndarray, box: np.ndarray, codes: np.ndarray,
                      pairs: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        """(energy eV, forces (N, 3) eV/Å); ``pairs`` must include every pair closer than the largest onset."""
        pos = np.ascontiguousarray(pos, dtype=float)
        box = np.asarray(box, float)
        if pairs is None:
            pairs = neighbour_pairs(pos, box, max(float(self.onset_angstrom.max()), 1e-3))
        return prior_energy_forces(pos, box, codes, self.onset_angstrom, self.epsilon_ev, self.decay_angstrom, pairs)

    def to_json(self) -> dict:
        s = self.species
        pairs = [(a, b) for a in range(len(s)) for b in range(a, len(s))]
        d, r0 = self.shortest_angstrom, self.onset_angstrom
        return {"form": "epsilon * (exp(x) - 1 - x - x^2/2), x = (onset - r) / decay, for r < onset; 0 above",
                "epsilon_eV": self.epsilon_ev, "decay_angstrom": self.decay_angstrom,
                "margin_angstrom": self.margin_angstrom,
                "shortest_training_distance_angstrom": {f"{s[a]}-{s[b]}": (float(d[a, b]) if np.isfinite(d[a, b])
                                                                            else None) for a, b in pairs},
                "onset_angstrom": {f"{s[a]}-{s[b]}": float(r0[a, b]) for a, b in pairs}}

    @classmethod
    def from_json(cls, d: dict, species: tuple[str, ...]) -> "ShortRangePrior":
        try:
            short = d["shortest_training_distance_angstrom"]
            mat = np.full((len(species), len(species)), np.inf)
            for key, v in short.items():
                a, b = key.split("-")
                i, j = species.index(a), species.index(b)
                mat[i, j] = mat[j, i] = np.inf if v is None else float(v)
            return cls(tuple(species), mat, float(d["margin_angstrom"]), float(d["epsilon_eV"]),
                       float(d["decay_angstrom"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"prior must hold shortest_training_distance_angstrom {{'A-B': r}}, margin_angstrom, "
                             f"epsilon_eV and decay_angstrom for the model's species: {exc!r}") from None
