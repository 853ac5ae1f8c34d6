"""Run one learning-based simulation: initial state, integrator, streamed zarr output,
checkpoints and exact resume, and a clear stop when the model explodes.

Output store (the trajectory schema, plus per-step thermo):

- frames every ``stride`` steps: positions, velocities, forces, accelerations, kinetic_energy,
  temperature, potential_energy (the model's E), conserved_energy (NVE: E_kin + E; NVT: the
  Nosé-Hoover chain invariant), with coords step / time / species;
- per step (dim ``md_step``): ``thermo_kinetic_energy``, ``thermo_temperature``,
  ``thermo_temperature_<species>``, ``thermo_conserved``, ``thermo_clipped``; with the action
  integrator also ``thermo_iterations`` and ``thermo_residual`` (its fixed point per step), and
  ``thermo_conserved`` only at frame steps (the energy at the end of a step costs a force
  evaluation there; NaN between);
- group ``checkpoint``: positions, velocities, thermostat chain, step, counts (and what the
  action integrator carries between steps) — what ``resume`` continues from, bitwise identically;
- attrs ``status``: ``running``, ``complete`` or ``failed: <reason>`` (what was written before a
  failure is kept).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import xarray as xr
import zarr

from .. import __version__
from ..errors import DynamicsError
from ..io.store import frame_block, open_trajectory, with_static
from ..model import Model
from ..units import AMU_A2_PER_FS2_TO_EV, BOLTZMANN_EV_K
from .integrators import ChainState, MDState, kinetic_energy, maxwell_boltzmann, nhc_invariant, \
    remove_com_velocity, thermostatted, velocity_verlet

__all__ = ["InitialState", "initial_state", "tile", "SimulationError", "simulate", "SimulationSummary", "INTEGRATORS"]

#: ``verlet``: velocity Verlet; ``action``: the learned long-step map (needs an action model);
#: ``midpoint``: the same map with the learned terms off (the implicit midpoint rule);
#: ``direct``: the structure-free baseline predictor (needs a direct model)
INTEGRATORS = ("verlet", "action", "midpoint", "direct")


class SimulationError(DynamicsError):
    """The model blew up (non-finite values, runaway temperature); the message says at which step."""


@dataclass(frozen=True)
class InitialState:
    positions: np.ndarray      # (N, 3) Å
    velocities: np.ndarray     # (N, 3) Å/fs
    species: tuple[str, ...]
    masses: np.ndarray         # (N,) amu
    box: np.ndarray            # (3,) Å, orthorhombic
    source: str


def tile(state: InitialState, n: int) -> InitialState:
    """The box repeated n x n x n (positions shifted by whole box vectors; same density)."""
    if n < 1:
        raise ValueError(f"tile must be >= 1, got {n}")
    if n == 1:
        return state
    shifts = np.array([[i, j, k] for i in range(n) for j in range(n) for k in range(n)], dtype=float) * state.box
    pos = (state.positions[None, :, :] + shifts[:, None, :]).reshape(-1, 3)
    return InitialState(pos, np.tile(state.velocities, (n**3, 1)), state.species * n**3,
                        np.tile(state.masses, n**3), state.box * n, f"{state.source} tiled {n}x{n}x{n}")


def initial_state(init: str, *, frame: int | None = None, temperature_K: float | None = None,
                  seed: int | None = None, tile_n: int = 1) -> InitialState:
    """From ``STORE[:FRAME]`` (positions and velocities of that frame, default the last), tiled
    ``tile_n`` times per axis; with ``temperature_K`` and ``seed`` the velocities of the whole
    box are redrawn from Maxwell-Boltzmann instead."""
    path, _, fr = str(init).partition(":")
    if fr and frame is None:
        try:
            frame = int(fr)
        except ValueError:
            raise ValueError(f"--init {init!r}: expected STORE or STORE:FRAME with an integer frame") from None
    ds = open_trajectory(path)
    n = ds.sizes["frame"]
    frame = n - 1 if frame is None else frame
    if not -n <= frame < n:
        raise ValueError(f"--init {init!r}: frame {frame} is outside the store's {n} frames")
    f = ds.isel(frame=frame)
    cell = f["cell"].values
    from ..invariants import orthorhombic_box

    box = orthorhombic_box(cell, f"{path} cell")
    masses = np.asarray(ds["masses"].values, float)
    vel = np.asarray(f["velocities"].values, float)
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
    return [2 * 0.5 * AMU_A2_PER_FS2_TO_EV * float(np.sum(masses[g, None] * v[g] ** 2)) / (3 * g.size * BOLTZMANN_EV_K)
            for g in groups]


def _write_checkpoint(root: zarr.Group, state: MDState, frames: int, extra: dict) -> None:
    """Replace the checkpoint group (written under a new name first, then swapped)."""
    store_path = Path(root.store.root)
    new = "checkpoint_new"
    if new in root:
        del root[new]
    g = root.create_group(new)
    g.create_array("positions", data=state.positions)
    g.create_array("velocities", data=state.velocities)
    if state.chain is not None:
        g.create_array("chain_xi", data=state.chain.xi)
        g.create_array("chain_v", data=state.chain.v)
    for name in extra.pop("aux_arrays", ()):
        g.create_array(f"aux_{name}", data=np.asarray(state.aux[name]))
    g.attrs.update({"step": int(state.step), "clipped": int(state.clipped), "frames": int(frames), **extra})
    old = store_path / "checkpoint"
    if old.exists():
        shutil.rmtree(old)
    os.replace(store_path / new, old)


def _aux_attrs(state: MDState, aux_arrays) -> dict:
    if not aux_arrays:
        return {}
    return {"aux_arrays": tuple(aux_arrays), "iterations": int(state.aux["iterations"]),
            "residual_angstrom": float(state.aux["residual_angstrom"])}


def _integrator(model: Model, init: InitialState, integrator: str, action, options: dict | None, dt_fs: float,
                stride: int, max_force):
    """(init_fn, step_fn, settings) of an NVE integrator."""
    if integrator not in INTEGRATORS:
        raise ValueError(f"integrator {integrator!r}; expected one of {INTEGRATORS}")
    if integrator == "verlet":
        if action is not None:
            raise ValueError("an action model needs --integrator action (or direct)")
        return (*velocity_verlet(model.force_fn(init.box, np.array(init.species)), dt_fs, init.masses,
                                 max_force_ev_per_angstrom=max_force), {})
    from .action import ActionModel, ModelPotential, action_integrator, default_features, direct_integrator

    if max_force is not None:
        raise ValueError(f"--max-force clips forces, which breaks the {integrator} map's structure; leave it out")
    if integrator == "midpoint":
        if action is not None:
            raise ValueError("the midpoint integrator takes no action model")
        action = ActionModel("action", dt_fs, default_features(model.species), np.zeros(default_features(
            model.species).n_features))
    elif action is None:
        raise ValueError(f"integrator {integrator!r} needs an action model (--action A.json)")
    want = "direct" if integrator == "direct" else "action"
    if action.kind != want:
        raise ValueError(f"integrator {integrator!r} needs a {want!r} model; the action file holds a {action.kind!r} model")
    if abs(action.dt_fs - dt_fs) > 1e-9 * dt_fs:
        raise ValueError(f"the {action.kind} model was fitted for steps of {action.dt_fs:g} fs; --dt-fs is {dt_fs:g}")
    potential = ModelPotential(model, init.box, init.species)
    options = dict(options or {})
    settings = {"integrator": integrator, "action_sha256": _digest(action)}
    if integrator == "direct":
        return (*direct_integrator(potential, action, init.masses, init.species, init.box), settings)
    settings["action_options"] = options
    options.setdefault("energy_every", stride)
    return (*action_integrator(potential, action, init.masses, init.species, init.box, **options), settings)


def _digest(action) -> str:
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
    to an uninterrupted run with the same arguments. ``write_forces=False`` leaves forces and
    accelerations out of the frames (half the output; what ensembles of long runs want).
    ``integrator`` is one of :data:`INTEGRATORS`; ``action`` the
    :class:`~ensemble.md.action.ActionModel` for ``action`` / ``direct`` (its step must equal
    ``dt_fs``), ``action_options`` keywords of :func:`~ensemble.md.action.action_integrator`
    (tolerance, iteration cap, ...).
    """
    out = Path(out)
    if steps < 1 or stride < 1 or dt_fs <= 0:
        raise ValueError("steps >= 1, stride >= 1 and dt_fs > 0 are required")
    if not set(init.species) <= set(model.species):
        raise ValueError(f"the initial state has species {sorted(set(init.species))}; the model knows {model.species}")
    masses = np.asarray(init.masses, float)
    model_mass = dict(zip(model.species, model.masses))
    bad = {s for s, m in zip(init.species, masses) if abs(model_mass[s] - m) > 1e-6 * m}
    if bad:
        raise ValueError(f"masses of {sorted(bad)} differ between the initial state and the model")
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

    if resume:
        if not out.exists():
            raise FileNotFoundError(f"{out}: nothing to resume")
        root = zarr.open_group(out, mode="r+")
        if json.loads(root.attrs["simulation_settings"]) != json.loads(json.dumps(settings)):
            raise ValueError(f"{out}: --resume needs the same settings as the original run "
                             f"({root.attrs['simulation_settings']})")
        ck = root["checkpoint"]
        state = init_fn(np.asarray(ck["positions"][:]), np.asarray(ck["velocities"][:]))
        chain = None
        if state.chain is not None:
            chain = ChainState(np.asarray(ck["chain_xi"][:]), np.asarray(ck["chain_v"][:]), state.chain.q)
        state = replace(state, step=int(ck.attrs["step"]), clipped=int(ck.attrs["clipped"]), chain=chain)
        if aux_arrays:
            state = replace(state, aux={**{k: ck.attrs[k] for k in ("iterations", "residual_angstrom")},
                                        **{k: np.asarray(ck[f"aux_{k}"][:]) for k in aux_arrays}})
        frames_written = int(ck.attrs["frames"])
        for name, arr in root.arrays():
            dims = arr.metadata.dimension_names or ()
            if dims and dims[0] == "frame" and arr.shape[0] > frames_written:
                arr.resize((frames_written,) + arr.shape[1:])
            if dims and dims[0] == "md_step" and arr.shape[0] > state.step:
                arr.resize((state.step,) + arr.shape[1:])
        root.attrs["status"] = "running"
    else:
        if out.exists():
            if not overwrite:
                raise FileExistsError(f"{out} already exists; choose another --out, pass --overwrite or --resume")
            shutil.rmtree(out)
        v0 = remove_com_velocity(init.velocities, masses) if remove_com else init.velocities
        state = init_fn(init.positions, v0)
        frames_written = 0
        root = None

    buf_frames: list = []
    buf_thermo: list = []
    t0 = time.perf_counter()
    status = "complete"

    def frame_record(s):
        return (s.step, s.step * dt_fs, s.positions.copy(), s.velocities.copy(), s.forces.copy(), s.potential_energy,
                conserved(s))

    def flush():
        nonlocal frames_written, root
        if buf_frames:
            blk = frame_block(step=[r[0] for r in buf_frames], time_fs=[r[1] for r in buf_frames],
                              positions=np.stack([r[2] for r in buf_frames]),
                              velocities=np.stack([r[3] for r in buf_frames]), masses=masses,
                              forces=np.stack([r[4] for r in buf_frames]) if write_forces else None,
                              potential_energy=[r[5] for r in buf_frames], conserved_energy=[r[6] for r in buf_frames])
            if root is None:
                blk = with_static(blk, species=init.species, masses=masses, cell=np.diag(init.box), attrs={
                    "title": f"learning-based MD ({model.kind} model)", "source_format": "ensemble simulate",
                    "timestep_fs": dt_fs, "frame_interval_fs": dt_fs * stride,
                    "acceleration_source": "model forces / masses", "initial_state": init.source,
                    "model_provenance": json.dumps(model.provenance), "simulation_settings": json.dumps(settings),
                    "temperature_dof": "3N - 3", "created_by": f"ensemble {__version__} simulate",
                    "status": "running", **(run_attrs or {})})
                enc = {v: {"chunks": tuple(block_frames if d == "frame" else blk.sizes[d] for d in blk[v].dims)}
                       for v in blk.variables if "frame" in blk[v].dims}
                blk.to_zarr(out, mode="w-", consolidated=False, zarr_format=3, encoding=enc)
                root = zarr.open_group(out, mode="r+")
            else:
                blk.attrs = dict(root.attrs)
                blk.to_zarr(out, append_dim="frame", consolidated=False, zarr_format=3)
                root = zarr.open_group(out, mode="r+")
            frames_written += len(buf_frames)
            buf_frames.clear()
        if buf_thermo:
            th = np.array(buf_thermo)
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
            tds = xr.Dataset(data, coords={"md_step": ("md_step", th[:, 0].astype(np.int64), {"units": "1"})})
            tds.attrs = dict(root.attrs)
            if "thermo_temperature" in root:
                tds.to_zarr(out, append_dim="md_step", consolidated=False, zarr_format=3)
            else:
                tds.to_zarr(out, mode="a", consolidated=False, zarr_format=3,
                            encoding={v: {"chunks": (max(1000, block_frames * stride),)} for v in tds.variables})
            root = zarr.open_group(out, mode="r+")
            buf_thermo.clear()

    if state.step == 0:
        buf_frames.append(frame_record(state))
    try:
        while state.step < steps:
            before = state.clipped
            state = step_fn(state)
            v, x, f = state.velocities, state.positions, state.forces
            t_all = 2 * kinetic_energy(v, masses) / ((3 * len(masses) - 3) * BOLTZMANN_EV_K)
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
            if len(buf_frames) >= block_frames or state.step % checkpoint_every == 0 or state.step == steps:
                flush()
                if state.step % checkpoint_every == 0 or state.step == steps:
                    _write_checkpoint(root, state, frames_written, _aux_attrs(state, aux_arrays))
            if progress is not None:
                progress(state.step, steps, time.perf_counter() - t0)
    except SimulationError as exc:
        status = f"failed: {exc}"
        flush()
        if root is not None:
            root.attrs["status"] = status
        raise
    except KeyboardInterrupt:
        flush()
        if root is not None:
            root.attrs["status"] = f"stopped at step {state.step}; resume continues from the last checkpoint"
        raise
    root.attrs["status"] = status
    thermo = xr.open_zarr(out, consolidated=False)
    temp_sp = {s: float(thermo[f"thermo_temperature_{s}"].mean()) for s in species_names}
    clipped_total = int(thermo["thermo_clipped"].sum())
    return SimulationSummary(out=out, steps_done=state.step, frames=frames_written,
                             clipped_atom_steps=clipped_total, clip_fraction=clipped_total / (len(masses) * max(steps, 1)),
                             mean_temperature_K=float(thermo["thermo_temperature"].mean()),
                             mean_temperature_species_K=temp_sp, seconds=time.perf_counter() - t0, status=status,
                             atoms=len(masses))
