"""Impulse multiple time stepping with the fast part on the implicit midpoint rule (a measured
dead end for issue 13's 4 fs step, kept so that the README's figures can be reproduced).

    python benchmarks/respa_midpoint.py [--dt-fs 4] [--steps 250] [--split molecules|distance]
                                        [--inner 1] [--model tests/data/models/conservative-c5.json]

One long step h is kick(V_slow, h/2), n implicit-midpoint steps of h/n of K + V_fast, kick(V_slow,
h/2): a composition of symplectic, time-reversible maps, so the whole is both. With velocity
Verlet inner steps (`ensemble simulate --integrator respa`) the O-H stretch turns by omega h ~ 2.8
rad per 4 fs step, next to the 1:2 resonance of the slow impulses at pi, and the run fails within
tens of steps. The midpoint rule turns a harmonic mode by 2 arctan(omega h / 2) instead (~1.9 rad
at 4 fs), away from pi; this script measures whether that is enough. The midpoint equations of the
fast part are solved by ``ensemble.md.action.action_integrator`` with the learned terms off, its
Newton matrix from the full model's cluster Hessian blocks.

NVE from frame 200 of the embedded data (128 H2O); prints the total energy of the full model, the
H and O kinetic temperatures and the fixed point's iterations as it goes, then the drift (linear fit,
meV/atom/ps), the force evaluations and the speed against velocity Verlet at 0.5 fs (one full
force evaluation per step, timed here). Kept outside the package: it did not reach the issue's
targets (the README gives the figures).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

for _v in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

from ensemble.data import load_default  # noqa: E402
from ensemble.md.action import (ActionDivergence, ActionModel, ModelPotential, action_integrator,  # noqa: E402
                                default_features)
from ensemble.md.integrators import _accel, kinetic_energy, temperature  # noqa: E402
from ensemble.md.respa import intramolecular_split, short_range_split  # noqa: E402
from ensemble.model import load_model  # noqa: E402


class FastPart:
    """V_fast of a respa split as a potential for the midpoint solver (forces, cluster Hessian)."""

    def __init__(self, model, q0, box, species, split: str):
        if split == "molecules":
            cut = intramolecular_split(model, q0, box, species)
            self.fn = model.restricted_force_fn(box, species, cut.pairs, cut.feature_shift)
        else:
            self.fn = short_range_split(model, q0, box, species).fast_model.force_fn(box, species)
        self.full = ModelPotential(model, box, species)
        self.evaluations = 0

    def forces(self, q):
        self.evaluations += 1
        return self.fn(q)

    def cluster_hessian(self, q, members, offsets, cluster_of, r_short):
        return self.full.cluster_hessian(q, members, offsets, cluster_of, r_short)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dt-fs", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--split", choices=("molecules", "distance"), default="molecules")
    ap.add_argument("--inner", type=int, default=1, help="midpoint steps per long step")
    ap.add_argument("--model", default="tests/data/models/conservative-c5.json")
    ap.add_argument("--frame", type=int, default=200)
    a = ap.parse_args(argv)
    ds = load_default()
    q = ds["positions"].values[a.frame].copy()
    v = ds["velocities"].values[a.frame].copy()
    species = np.array(ds["species"].values)
    masses = ds["masses"].values
    box = np.diag(ds["cell"].values).copy()
    model = load_model(a.model)
    full = model.force_fn(box, species)
    fast = FastPart(model, q, box, species, a.split)
    h = a.dt_fs
    zeros = np.zeros(default_features(model.species).n_features)
    init_m, step_m = action_integrator(fast, ActionModel("action", h / a.inner, default_features(model.species), zeros),
                                       masses, species, box, energy_every=10 ** 9)
    state = init_m(q, v)
    ff = state.forces
    f, e = full(q)
    is_h = species == "H"

    def species_temperature(vel, atoms):
        return temperature(vel[atoms], masses[atoms], dof=3 * int(atoms.sum()))

    e0 = kinetic_energy(v, masses) + e
    rows, its = [], []
    t0 = time.perf_counter()
    n_full = 1
    failed = None
    for s in range(a.steps):
        v = v + 0.5 * h * _accel(f - ff, masses)
        try:
            for _ in range(a.inner):
                state = step_m(replace(state, positions=q, velocities=v))
                q, v = state.positions, state.velocities
                its.append(state.aux["iterations"])
        except ActionDivergence as exc:                # the fixed point's divergence ends the run
            failed = str(exc)
            break
        ff, _ = fast.forces(q)
        f, e = full(q)
        n_full += 1
        v = v + 0.5 * h * _accel(f - ff, masses)
        rows.append(((s + 1) * h, kinetic_energy(v, masses) + e, species_temperature(v, is_h), species_temperature(v, ~is_h)))
        if (s + 1) % max(1, a.steps // 20) == 0:
            r = np.array(rows[-50:])
            print(f"t {rows[-1][0]:7.0f} fs  E - E0 {rows[-1][1] - e0:+.4f} eV  T_H {r[:, 2].mean():.0f} K  "
                  f"T_O {r[:, 3].mean():.0f} K  iterations/step {np.mean(its[-50:]):.1f}", flush=True)
    r = np.array(rows)
    out = {"ran_fs": float(r[-1, 0]) if len(r) else 0.0, "failed": failed, "full_evaluations": n_full,
           "fast_evaluations": fast.evaluations, "wall_s": time.perf_counter() - t0}
    t = time.perf_counter()
    for _ in range(20):
        full(q)
    verlet_s = 2000 * (time.perf_counter() - t) / 20          # one force evaluation per 0.5 fs step
    out["speed_vs_verlet_05fs"] = verlet_s * out["ran_fs"] / 1000 / out["wall_s"]
    if len(r):
        out["max_energy_error_ev"] = float(np.abs(r[:, 1] - e0).max())
    if len(r) > 10:
        out.update(drift_mev_per_atom_ps=float(np.polyfit(r[:, 0] / 1000, r[:, 1], 1)[0] / len(species) * 1000),
                   t_h=float(r[:, 2].mean()), t_o=float(r[:, 3].mean()))
    print(out)
    return out


if __name__ == "__main__":
    main()
