"""Run one learning-based simulation: initial state, integrator, streamed zarr output,
checkpoints and exact resume, and a clear stop when the model explodes.

Output store (the trajectory schema, plus per-step thermo; written by :mod:`ensemble.md.output`):

- frames every ``stride`` steps: positions, velocities, forces, accelerations, kinetic_energy,
  temperature, potential_energy (the model's E), conserved_energy (NVE: E_kin + E; NVT: the
  Nosé-Hoover chain invariant), with coords step / time / species;
- per step (dim ``md_step``): ``thermo_kinetic_energy``, ``thermo_temperature``,
  ``thermo_temperature_<species>``, ``thermo_conserved``, ``thermo_clipped``; with the action
  integrator also ``thermo_iterations`` and ``thermo_residual`` (its fixed point per step), and
  ``thermo_conserved`` only at frame steps (the energy at the end of a step costs a force
  evaluation there; NaN between);
- group ``checkpoint``: positions, velocities, thermostat chain, step, counts (and what the action
  integrator carries between steps): what ``resume``
  continues from, bitwise identically; replaced atomically, and the run's fingerprint (model,
  initial state, settings) is kept so a resume cannot continue another run;
- attrs ``status``: ``running``, ``complete``, ``failed: <reason>`` (what was written before a
  failure is kept) or ``stopped at step N; ...`` (trimmed back to the last checkpoint).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import xarray as xr

from .. import __version__, thermo
from ..errors import DynamicsError, UserError
from ..io.store import frame_block, open_trajectory, open_zarr, with_static
from ..model import Model
from .integrators import ChainState, MDState, kinetic_energy, maxwell_boltzmann, nhc_invariant, \
    remove_com_velocity, thermostatted, velocity_verlet
from .output import RunStore, fingerprint

__all__ = ["InitialState", "initial_state", "tile", "SimulationError", "SettingsError", "simulate",
           "SimulationSummary", "check_initial_state", "INTEGRATORS"]

#: ``verlet``: velocity Verlet; ``action``: the learned long-step map (needs an action model);
#: ``midpoint``: the same map with the learned terms off (the implicit midpoint rule);
#: ``direct``: the structure-free baseline predictor (needs a direct model); ``respa``: multiple
#: time stepping, the model's short-range part on a short inner step (:mod:`ensemble.md.respa`)
INTEGRATORS = ("verlet", "action", "midpoint", "direct", "respa")


class SimulationError(DynamicsError):
    """The model blew up (non-finite values, runaway temperature); the message says at which step."""


class SettingsError(UserError, ValueError):
    """A simulation setting or the initial state is out of range (refused before anything is written)."""


@dataclass(frozen=True)
class InitialState:
    positions: np.ndarray      # (N, 3) Å
    velocities: np.ndarray     # (N, 3) Å/fs
    species: tuple[str, ...]
    masses: np.ndarray         # (N,) amu
    box: np.ndarray            # (3,) Å, orthorhombic
    source: str
    tile_n: int = 1            # the stored box repeated tile_n times per axis


def tile(state: InitialState, n: int) -> InitialState:
    """The box repeated n x n x n (positions shifted by whole box vectors; same density)."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise SettingsError(f"tile must be an integer >= 1, got {n!r}")
    if n == 1:
        return state
    shifts = np.array([[i, j, k] for i in range(n) for j in range(n) for k in range(n)], dtype=float) * state.box
    pos = (state.positions[None, :, :] + shifts[:, None, :]).reshape(-1, 3)
    return InitialState(pos, np.tile(state.velocities, (n**3, 1)), state.species * n**3,
                        np.tile(state.masses, n**3), state.box * n, f"{state.source} tiled {n}x{n}x{n}",
                        state.tile_n * n)


def initial_state(init: str, *, frame: int | None = None, temperature_K: float | None = None,
                  seed: int | None = None, tile_n: int = 1) -> InitialState:
    """From ``STORE[:FRAME]`` (positions and velocities of that frame, default the last), tiled
    ``tile_n`` times per axis; with ``temperature_K`` and ``seed`` the velocities of the whole
    box are redrawn from Maxwell-Boltzmann instead."""
    path, _, fr = str(init).partition(":")
    if temperature_K is not None and not (isinstance(temperature_K, (int, float)) and math.isfinite(temperature_K)
                                          and temperature_K >= 0):
        raise SettingsError(f"--init-temperature-K must be a finite temperature >= 0 K, got {temperature_K!r}")
    if seed is not None and not (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0):
        raise SettingsError(f"--seed must be an integer >= 0, got {seed!r}")
    if fr and frame is None:
        try:
            frame = int(fr)
        except ValueError:
            raise SettingsError(f"--init {init!r}: expected STORE or STORE:FRAME with an integer frame") from None
    ds = open_trajectory(path)
    n = ds.sizes["frame"]
    frame = n - 1 if frame is None else frame
    if not -n <= frame < n:
        raise SettingsError(f"--init {init!r}: frame {frame} is outside the store's {n} frames")
    if "velocities" not in ds and (temperature_K is None or seed is None):
        raise SettingsError(f"--init {init!r}: the store has no velocities (a configuration set?); "
                            "give --seed (and --init-temperature-K) to draw them from Maxwell-Boltzmann")
    f = ds.isel(frame=frame)
    cell = f["cell"].values
    from ..invariants import orthorhombic_box

    try:
        box = orthorhombic_box(cell, f"{path} cell")
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    masses = np.asarray(ds["masses"].values, float)
    if "velocities" in ds:
        vel = np.asarray(f["velocities"].values, float)
    else:                                 # a configuration set: drawn below (checked above)
        vel = np.zeros_like(np.asarray(f["positions"].values, float))
    state = tile(InitialState(np.asarray(f["positions"].values, float), vel,
                              tuple(str(s) for s in ds["species"].values), masses, box,
                              f"{Path(path).resolve()} frame {frame % n}"), tile_n)
    if temperature_K is not None and seed is not None:     # drawn for the whole (tiled) box: no copies
        state = replace(state, velocities=maxwell_boltzmann(state.masses, temperature_K, np.random.default_rng(seed)))
    return state


@dataclass(frozen=True)
class SimulationSummary:
    out: Path
    steps_done: int
    frames: int
    clipped_atom_steps: int
    clip_fraction: float
    mean_temperature_K: float
    mean_temperature_species_K: dict
    seconds: float
    status: str
    atoms: int = 0

    @property
    def atom_steps_per_s(self) -> float:
        return self.atoms * self.steps_done / self.seconds if self.seconds > 0 else float("inf")


def _species_temperatures(v, masses, groups):
    return [thermo.temperature(thermo.kinetic_energy(v[g], masses[g]), 3 * g.size) for g in groups]


def _finite_positive(name: str, value, *, optional: bool = False, integer: bool = False) -> None:
    if value is None and optional:
        return
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) if integer else \
        isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not ok or not np.isfinite(value) or value <= 0:
        kind = "an integer >= 1" if integer else "a finite number > 0"
        raise SettingsError(f"{name} must be {kind}, got {value!r}")


def check_initial_state(model: Model, init: InitialState) -> None:
    """Refuse an initial state the model cannot run: unknown species, other masses, non-finite or
    far-flung coordinates, a bad box, or a tiled box for a paper-mode model (its invariants sum
    over the whole box: they do not transfer)."""
    species = set(init.species)
    if not species <= set(model.species):
        raise SettingsError(f"the initial state has species {sorted(species)}; the model knows {list(model.species)}")
    masses = np.asarray(init.masses, float)
    model_mass = dict(zip(model.species, model.masses))
    bad = sorted({s for s, m in zip(init.species, masses) if not abs(model_mass[s] - m) <= 1e-6 * m})
    if bad:
        found = {s: float(m) for s, m in zip(init.species, masses) if s in bad}
        raise SettingsError(f"masses of {bad} differ between the initial state ({found} amu) and the model "
                            f"({ {s: model_mass[s] for s in bad} } amu)")
    box = np.asarray(init.box, float)
    if box.shape != (3,) or not (np.isfinite(box).all() and (box > 0).all()):
        raise SettingsError(f"the box must be 3 finite positive edges (Å), got {box.tolist()}")
    for name, arr in (("positions", init.positions), ("velocities", init.velocities)):
        arr = np.asarray(arr, float)
        if arr.shape != (len(init.species), 3):
            raise SettingsError(f"{name}: expected ({len(init.species)}, 3), got {arr.shape}")
        if not np.isfinite(arr).all():
            atom = int(np.argmax(~np.isfinite(arr).all(axis=1)))
            raise SettingsError(f"{name} of atom {atom} are not finite ({arr[atom].tolist()}) in {init.source}")
    far = np.abs(np.asarray(init.positions, float)) > 10 * box
    if far.any():
        atom = int(np.argmax(far.any(axis=1)))
        raise SettingsError(f"atom {atom} is at {np.asarray(init.positions)[atom].tolist()} Å, more than 10 box "
                            f"lengths ({box.tolist()} Å) from the origin: not a state of this box")
    if init.tile_n > 1 and model.cutoff_angstrom is None:
        raise SettingsError(f"a tiled box ({init.tile_n}x{init.tile_n}x{init.tile_n}) asks the model for a larger "
                            "system, but this model is in paper mode (all minimum-image pairs, long-range weights): "
                            "its invariants depend on the box and do not transfer. Fit it with --cutoff, or do not tile")


def _checkpoint_arrays(state: MDState, aux_arrays=()) -> dict:
    arrays = {"positions": state.positions, "velocities": state.velocities}
    if state.chain is not None:
        arrays.update(chain_xi=state.chain.xi, chain_v=state.chain.v)
    for name in aux_arrays:
        arrays[f"aux_{name}"] = np.asarray(state.aux[name])
    return arrays


def _integrator(model: Model, init: InitialState, integrator: str, action, options: dict | None, dt_fs: float,
                stride: int, max_force):
    """(init_fn, step_fn, settings) of an NVE integrator."""
    if integrator not in INTEGRATORS:
        raise SettingsError(f"integrator {integrator!r}; expected one of {INTEGRATORS}")
    if integrator == "verlet":
        if action is not None:
            raise SettingsError("an action model needs --integrator action (or direct)")
        return (*velocity_verlet(model.force_fn(init.box, np.array(init.species)), dt_fs, init.masses,
                                 max_force_ev_per_angstrom=max_force), {})
    if integrator == "respa":
        return _respa_integrator(model, init, action, options, dt_fs, max_force)
    from .action import ActionModel, ModelPotential, action_integrator, default_features, direct_integrator

    if max_force is not None:
        raise SettingsError(f"--max-force clips forces, which breaks the {integrator} map's structure; leave it out")
    if integrator == "midpoint":
        if action is not None:
            raise SettingsError("the midpoint integrator takes no action model")
        action = ActionModel("action", dt_fs, default_features(model.species), np.zeros(default_features(
            model.species).n_features))
    elif action is None:
        raise SettingsError(f"integrator {integrator!r} needs an action model (--action A.json)")
    want = "direct" if integrator == "direct" else "action"
    if action.kind != want:
        raise SettingsError(f"integrator {integrator!r} needs a {want!r} model; the action file holds a "
                            f"{action.kind!r} model")
    if abs(action.dt_fs - dt_fs) > 1e-9 * dt_fs:
        raise SettingsError(f"the {action.kind} model was fitted for steps of {action.dt_fs:g} fs; --dt-fs is {dt_fs:g}")
    potential = ModelPotential(model, init.box, init.species)
    options = dict(options or {})
    settings = {"integrator": integrator, "action_sha256": _action_digest(action)}
    if integrator == "direct":
        return (*direct_integrator(potential, action, init.masses, init.species, init.box), settings)
    settings["action_options"] = options
    options.setdefault("energy_every", stride)
    return (*action_integrator(potential, action, init.masses, init.species, init.box, **options), settings)


def _respa_integrator(model: Model, init: InitialState, action, options: dict | None, dt_fs: float, max_force):
    """r-RESPA with the split of the run's initial state (rebuilt identically on resume).

    Options: ``split`` (``distance``, the default, or ``molecules``), ``split_angstrom`` (the
    distance split; default :func:`~ensemble.md.respa.short_range_split`'s), ``bond_angstrom`` (1.3,
    the molecules split), ``inner_steps`` (default: inner steps of 0.5 fs)."""
    from .respa import SPLITS, default_inner_steps, fast_force_fn, respa

    if action is not None:
        raise SettingsError("the respa integrator takes no action model")
    if max_force is not None:
        raise SettingsError("--max-force clips forces, which breaks the respa splitting; leave it out")
    if model.kind != "conservative":
        raise SettingsError(f"the respa integrator splits a potential energy; the model is of kind {model.kind!r} "
                            "(its forces have none), use a conservative model")
    options = dict(options or {})
    known = {"inner_steps", "split", "split_angstrom", "bond_angstrom"}
    if set(options) - known:
        raise SettingsError(f"respa options {sorted(set(options) - known)}; expected {', '.join(sorted(known))}")
    split = options.get("split", "distance")
    if split not in SPLITS:
        raise SettingsError(f"respa split {split!r}; expected one of {SPLITS}")
    n_inner = options.get("inner_steps") or default_inner_steps(dt_fs, split)
    if not (isinstance(n_inner, (int, np.integer)) and not isinstance(n_inner, bool) and n_inner >= 1):
        raise SettingsError(f"--inner-steps must be an integer >= 1, got {n_inner!r}")
    _finite_positive("split_angstrom", options.get("split_angstrom"), optional=True)
    _finite_positive("bond_angstrom", options.get("bond_angstrom", 1.3))
    species = np.array(init.species)
    try:
        fast, split_settings = fast_force_fn(model, init.positions, init.box, species, split,
                                             split_angstrom=options.get("split_angstrom"),
                                             bond_angstrom=options.get("bond_angstrom", 1.3))
    except ValueError as exc:
        raise SettingsError(f"--split-angstrom: {exc}") from None
    settings = {"integrator": "respa", "inner_steps": int(n_inner), **split_settings}
    return (*respa(model.force_fn(init.box, species), fast, dt_fs, int(n_inner), init.masses), settings)


def _action_digest(action) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(action.to_json()["coefficients"]).encode()
                          + json.dumps(action.features.to_json()).encode()).hexdigest()[:16]


def simulate(model: Model, init: InitialState, *, steps: int, dt_fs: float = 0.5, temperature_K: float | None = None,
             stride: int = 10, tau_fs: float = 100.0, chain_length: int = 3, max_force_ev_per_angstrom: float | None = None,
             remove_com: bool = True, max_temperature_K: float = 5000.0, checkpoint_every: int = 1000,
             block_frames: int = 100, out: str | Path, resume: bool = False, overwrite: bool = False,
             progress: Callable[[int, int, float], None] | None = None, run_attrs: dict | None = None,
             write_forces: bool = True, integrator: str = "verlet", action=None,
             action_options: dict | None = None) -> SimulationSummary:
    """Integrate ``steps`` steps (NVT with a Nosé-Hoover chain when ``temperature_K`` is given,
    else NVE) and stream frames every ``stride`` steps to ``out``.

    ``resume`` continues a stopped run from its last checkpoint; the result is bitwise identical
    to an uninterrupted run with the same arguments (model, initial state and settings are
    checked against the run's fingerprint). ``write_forces=False`` leaves forces and
    accelerations out of the frames (half the output; what ensembles of long runs want). Every
    setting and the initial state are checked before anything is written (SettingsError).
    ``integrator`` is one of :data:`INTEGRATORS`; ``action`` the
    :class:`~ensemble.md.action.ActionModel` for ``action`` / ``direct`` (its step must equal
    ``dt_fs``), ``action_options`` keywords of :func:`~ensemble.md.action.action_integrator`
    (tolerance, iteration cap, ...) or, for ``respa``, its split and inner steps (``split``,
    ``split_angstrom``, ``bond_angstrom``, ``inner_steps``).
    """
    out = Path(out)
    for name, value in (("steps", steps), ("stride", stride), ("checkpoint_every", checkpoint_every),
                        ("block_frames", block_frames), ("chain_length", chain_length)):
        _finite_positive(name, value, integer=True)
    for name, value, optional in (("dt_fs", dt_fs, False), ("temperature_K", temperature_K, True),
                                  ("tau_fs", tau_fs, False), ("max_force_ev_per_angstrom", max_force_ev_per_angstrom, True),
                                  ("max_temperature_K", max_temperature_K, False)):
        _finite_positive(name, value, optional=optional)
    check_initial_state(model, init)
    masses = np.asarray(init.masses, float)
    init_fn, step_fn, extra_settings = _integrator(model, init, integrator, action, action_options, dt_fs, stride,
                                                   max_force_ev_per_angstrom)
    aux_arrays = getattr(init_fn, "aux_arrays", ())
    if temperature_K is None:
        def conserved(s):
            return kinetic_energy(s.velocities, masses) + s.potential_energy
    else:
        init_fn, step_fn = thermostatted(init_fn, step_fn, dt_fs, masses, temperature_K, tau_fs=tau_fs,
                                         chain_length=chain_length)

        def conserved(s):
            return nhc_invariant(s, masses, temperature_K)
    species_names = sorted(set(init.species))
    groups = [np.flatnonzero(np.array(init.species) == s) for s in species_names]
    settings = {"steps": steps, "dt_fs": dt_fs, "temperature_K": temperature_K, "stride": stride, "tau_fs": tau_fs,
                "chain_length": chain_length, "max_force_ev_per_angstrom": max_force_ev_per_angstrom,
                "remove_com": remove_com, "kind": model.kind, **extra_settings}
    if not write_forces:
        settings["write_forces"] = False
    run_fp = fingerprint(model.to_json(), init.positions, init.velocities, init.species, masses, init.box, settings)
    dof = thermo.degrees_of_freedom(len(masses))

    def frame_record(s):
        return (s.step, s.step * dt_fs, s.positions.copy(), s.velocities.copy(), s.forces.copy(), s.potential_energy,
                conserved(s))

    def frames_block(records):
        return frame_block(step=[r[0] for r in records], time_fs=[r[1] for r in records],
                           positions=np.stack([r[2] for r in records]), velocities=np.stack([r[3] for r in records]),
                           masses=masses, forces=np.stack([r[4] for r in records]) if write_forces else None,
                           potential_energy=[r[5] for r in records], conserved_energy=[r[6] for r in records])

    def thermo_block(rows):
        th = np.array(rows)
        data = {"thermo_kinetic_energy": (("md_step",), th[:, 1], {"units": "eV"}),
                "thermo_temperature": (("md_step",), th[:, 2], {"units": "K"}),
                "thermo_conserved": (("md_step",), th[:, 3], {"units": "eV"}),
                "thermo_clipped": (("md_step",), th[:, 4].astype(np.int64), {"units": "1"})}
        for i, s in enumerate(species_names):
            data[f"thermo_temperature_{s}"] = (("md_step",), th[:, 5 + i], {"units": "K"})
        if aux_arrays:
            k = 5 + len(species_names)
            data["thermo_iterations"] = (("md_step",), th[:, k].astype(np.int64),
                                         {"units": "1", "long_name": "fixed-point iterations (force evaluations)"})
            data["thermo_residual"] = (("md_step",), th[:, k + 1],
                                       {"units": "angstrom", "long_name": "fixed-point residual at exit"})
        return xr.Dataset(data, coords={"md_step": ("md_step", th[:, 0].astype(np.int64), {"units": "1"})})

    def checkpoint_attrs(s, frames):
        attrs = {"step": int(s.step), "clipped": int(s.clipped), "frames": int(frames)}
        if aux_arrays:
            attrs.update(iterations=int(s.aux["iterations"]), residual_angstrom=float(s.aux["residual_angstrom"]))
        return attrs

    if resume:
        store, ck = RunStore.reopen(out, run_fp)
        state = init_fn(np.asarray(ck.arrays["positions"]), np.asarray(ck.arrays["velocities"]))
        chain = None
        if state.chain is not None:
            chain = ChainState(np.asarray(ck.arrays["chain_xi"]), np.asarray(ck.arrays["chain_v"]), state.chain.q)
        state = replace(state, step=ck.step, clipped=ck.clipped, chain=chain)
        if aux_arrays:
            state = replace(state, aux={**{k: ck.attrs[k] for k in ("iterations", "residual_angstrom")},
                                        **{k: np.asarray(ck.arrays[f"aux_{k}"]) for k in aux_arrays}})
        frames_written = ck.frames
        store.set_attrs(status="running")
    else:
        v0 = remove_com_velocity(init.velocities, masses) if remove_com else init.velocities
        state = init_fn(init.positions, v0)
        first = with_static(frames_block([frame_record(state)]), species=init.species, masses=masses,
                            cell=np.diag(init.box), attrs={
                                "title": f"learning-based MD ({model.kind} model)", "source_format": "ensemble simulate",
                                "timestep_fs": dt_fs, "frame_interval_fs": dt_fs * stride,
                                "acceleration_source": "model forces / masses", "initial_state": init.source,
                                "model_provenance": json.dumps(model.provenance),
                                "simulation_settings": json.dumps(settings), "run_fingerprint": json.dumps(run_fp),
                                "temperature_dof": "3N - 3", "created_by": f"ensemble {__version__} simulate",
                                "status": "running", **(run_attrs or {})})
        store = RunStore.create(out, first, block_frames, _checkpoint_arrays(state, aux_arrays),
                                checkpoint_attrs(state, 1), overwrite=overwrite)
        frames_written = 1

    buf_frames: list = []
    buf_thermo: list = []
    t0 = time.perf_counter()
    thermo_chunk = max(1000, block_frames * stride)

    def flush():
        nonlocal frames_written
        store.append(frames_block(buf_frames) if buf_frames else None, thermo_block(buf_thermo) if buf_thermo else None,
                     thermo_chunk)
        frames_written += len(buf_frames)
        buf_frames.clear()
        buf_thermo.clear()

    try:
        while state.step < steps:
            before = state.clipped
            state = step_fn(state)
            v, x, f = state.velocities, state.positions, state.forces
            t_all = thermo.temperature(kinetic_energy(v, masses), dof)
            if not (np.isfinite(x).all() and np.isfinite(v).all() and np.isfinite(f).all()):
                raise SimulationError(f"step {state.step}: non-finite positions, velocities or forces")
            if t_all > max_temperature_K:
                raise SimulationError(f"step {state.step}: temperature {t_all:.0f} K exceeds {max_temperature_K:.0f} K "
                                      "(runaway heating)")
            row = [state.step, kinetic_energy(v, masses), t_all, conserved(state), state.clipped - before,
                   *_species_temperatures(v, masses, groups)]
            if aux_arrays:
                row += [state.aux["iterations"], state.aux["residual_angstrom"]]
            buf_thermo.append(row)
            if state.step % stride == 0:
                buf_frames.append(frame_record(state))
            at_checkpoint = state.step % checkpoint_every == 0 or state.step == steps
            if len(buf_frames) >= block_frames or at_checkpoint:
                flush()
                if at_checkpoint:
                    store.checkpoint(_checkpoint_arrays(state, aux_arrays), checkpoint_attrs(state, frames_written))
            if progress is not None:
                progress(state.step, steps, time.perf_counter() - t0)
    except SimulationError as exc:
        flush()
        store.finish(f"failed: {exc}")
        raise
    except KeyboardInterrupt:
        ck = store.rollback()
        store.finish(f"stopped at step {state.step}; resume continues from the checkpoint at step {ck.step}")
        raise
    status = "complete"
    store.finish(status)
    th = open_zarr(out)
    temp_sp = {s: float(th[f"thermo_temperature_{s}"].mean()) for s in species_names}
    clipped_total = int(th["thermo_clipped"].sum())
    return SimulationSummary(out=out, steps_done=state.step, frames=frames_written,
                             clipped_atom_steps=clipped_total, clip_fraction=clipped_total / (len(masses) * max(steps, 1)),
                             mean_temperature_K=float(th["thermo_temperature"].mean()),
                             mean_temperature_species_K=temp_sp, seconds=time.perf_counter() - t0, status=status,
                             atoms=len(masses))
