"""Ingest ASE-readable trajectories (extxyz, ASE .traj, ...) and export stores to extxyz.

ASE's units differ from ours only in velocity (Å per ASE time unit, Å sqrt(amu/eV)):
positions Å, forces eV/Å and energies eV pass through unchanged. Time comes from
``atoms.info["time"]`` (fs; written by :func:`write_extxyz`) or from ``dt_fs``.

Files without velocities (most published DFT training sets: extxyz with energies and forces)
become *configuration sets*: frames are independent configurations with no time axis, no
velocities and no kinetic checks; they must carry forces, the cell is stored per frame, and
the store's ``attrs["configuration_set"]`` is True (the fit splits them by a seeded shuffle).
"""

from __future__ import annotations

import hashlib
import time as _time
from pathlib import Path

import numpy as np
import xarray as xr

from .. import __version__
from ..units import ASE_VELOCITY_TO_ANGSTROM_PER_FS
from .cp2k import IngestError, IngestReport
from .store import UNITS, atomic_output, default_chunk_frames, frame_block, open_trajectory, with_static

__all__ = ["ingest_ase", "write_extxyz"]


def _frame_arrays(atoms, k: int, path: Path, species: tuple[str, ...], masses_override):
    sym = tuple(atoms.get_chemical_symbols())
    if sym != species:
        a = next((i for i, (p, q) in enumerate(zip(sym, species)) if p != q), min(len(sym), len(species)))
        raise IngestError(f"{path}: frame {k} has {len(sym)} atoms / species {sym[a:a + 1]} at atom {a + 1}; "
                          f"frame 0 has {len(species)} atoms / {species[a:a + 1]}: species order must match")
    vel = atoms.get_velocities() if atoms.has("momenta") else None
    forces = None
    energy = np.nan
    if atoms.calc is not None:
        try:
            forces = atoms.calc.get_forces(atoms)
        except Exception:
            forces = None
        try:
            energy = float(atoms.calc.get_potential_energy(atoms))
        except Exception:
            energy = np.nan
    cell = np.array(atoms.cell)
    return (atoms.get_positions(), None if vel is None else vel * ASE_VELOCITY_TO_ANGSTROM_PER_FS, forces, energy,
            cell, atoms.info.get("time"), atoms.info.get("step"))


def ingest_ase(path: str | Path, out: str | Path, *, format: str | None = None, dt_fs: float | None = None,
               masses: dict[str, float] | None = None, cell=None, chunk_frames: int | None = None,
               overwrite: bool = False) -> IngestReport:
    """Stream an ASE-readable trajectory (``ase.io.iread``) into a trajectory store.

    Parameters
    ----------
    path : path
        Trajectory file (any format ``ase.io`` reads; ``format`` overrides detection).
    dt_fs : float, optional
        Time between frames (fs) when frames carry no ``info["time"]`` (not for configuration sets).
    masses : dict, optional
        amu per element; default: the file's masses, else ASE's standard masses.
    """
    import ase.io

    t0 = _time.perf_counter()
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise IngestError(f"{path}: no such file")
    if out.exists() and not overwrite:
        raise IngestError(f"{out} already exists; choose another --out or pass --overwrite")
    try:
        frames = ase.io.iread(str(path), index=":", format=format)
        first = next(frames)
    except StopIteration:
        raise IngestError(f"{path}: no frames") from None
    except Exception as exc:
        raise IngestError(f"{path}: ASE cannot read it ({type(exc).__name__}: {exc})") from exc
    species = tuple(first.get_chemical_symbols())
    natoms = len(species)
    configurations = not first.has("momenta")      # no velocities: a set of configurations, not a trajectory
    if configurations and dt_fs is not None:
        raise IngestError(f"{path}: frame 0 has no velocities, so it is read as a configuration set (no time "
                          "axis); --dt-fs does not apply")
    mass = first.get_masses().astype(float)
    if masses:
        mass = np.array([masses.get(s, m) for s, m in zip(species, mass)])
    chunk = int(chunk_frames or default_chunk_frames(natoms))
    h = hashlib.sha256(path.read_bytes()) if path.stat().st_size < 2**31 else None

    def blocks():
        buf = [first]
        for atoms in frames:
            buf.append(atoms)
            if len(buf) == chunk:
                yield buf
                buf = []
        if buf:
            yield buf

    n = 0
    has_forces = None
    cell0 = None
    with atomic_output(out, overwrite=overwrite) as tmp:
        for block in blocks():
            rows = [_frame_arrays(a, n + i, path, species, masses) for i, a in enumerate(block)]
            pos = np.stack([r[0] for r in rows])
            for i, r in enumerate(rows):
                if (r[1] is None) != configurations:
                    raise IngestError(f"{path}: frame {n + i} {'has' if configurations else 'has no'} velocities "
                                      f"(momenta), frame 0 {'has none' if configurations else 'has them'}: "
                                      "every frame needs them, or none (a configuration set)")
            vel = None if configurations else np.stack([r[1] for r in rows])
            frc = [r[2] for r in rows]
            if has_forces is None:
                has_forces = frc[0] is not None
                if configurations and not has_forces:
                    raise IngestError(f"{path}: frame 0 has neither velocities nor forces; a configuration set "
                                      "needs forces (the fit's targets)")
            if has_forces and any(f is None for f in frc):
                raise IngestError(f"{path}: some frames have forces and some do not (from frame {n})")
            if cell0 is None:
                cell0 = np.asarray(cell, float) if cell is not None else rows[0][4]
                if cell0.shape == (3,):
                    cell0 = np.diag(cell0)
                if not np.any(cell0):
                    raise IngestError(f"{path}: frame 0 has no cell; pass --cell A B C (Å)")
            times = [r[5] for r in rows]
            if configurations:
                times = None
                steps = [n + i for i in range(len(rows))]          # the configuration's index in the file
            else:
                if any(t is None for t in times):
                    if dt_fs is None:
                        raise IngestError(f"{path}: frames carry no info['time']; pass --dt-fs (time between frames)")
                    times = [(n + i) * float(dt_fs) for i in range(len(rows))]
                steps = [r[6] if r[6] is not None else n + i for i, r in enumerate(rows)]
            for name, arr in (("positions", pos), ("velocities", vel),
                              ("forces", np.stack(frc) if has_forces else None)):
                if arr is not None and not np.isfinite(arr).all():
                    f = n + int(np.argwhere(~np.isfinite(arr))[0][0])
                    raise IngestError(f"{path}: frame {f} has a non-finite value in {name}")
            epot = np.array([r[3] for r in rows])
            cells = None
            if configurations:
                cells = np.stack([np.asarray(cell, float) if cell is not None else r[4] for r in rows])
                if cells.shape[1:] == (3,):
                    cells = np.stack([np.diag(c) for c in cells])
                bad = [i for i, c in enumerate(cells) if not np.any(c)]
                if bad:
                    raise IngestError(f"{path}: frame {n + bad[0]} has no cell; pass --cell A B C (Å)")
            ds = frame_block(step=steps, time_fs=times, positions=pos, velocities=vel, masses=mass,
                             forces=np.stack(frc) if has_forces else None,
                             potential_energy=epot if np.isfinite(epot).all() else None, cell=cells)
            if n == 0:
                kind_attrs = ({"configuration_set": True, "title": f"configurations read by ASE from {path.name}",
                               "acceleration_source": "forces / masses"} if configurations else {})
                ds = with_static(ds, species=species, masses=mass, cell=cell0, mass_source=(
                    "given by the user" if masses else "masses of the file / ASE"), attrs={
                            "title": f"trajectory read by ASE from {path.name}",
                            "source_format": f"ase:{format or 'auto'}",
                            "source_files": [{"role": "trajectory", "path": str(path.resolve()),
                                              "size_bytes": path.stat().st_size,
                                              "sha256": h.hexdigest() if h else "not computed (> 2 GiB)"}],
                            "acceleration_source": "forces / masses" if has_forces else
                            "finite differences of velocities in time (numpy.gradient)",
                            "mass_source": "given by the user" if masses else "masses of the file / ASE",
                            "cell_source": "given by the user (--cell)" if cell is not None else "file",
                            "temperature_dof": "3N - 3",
                            "created_by": f"ensemble {__version__} ingest (ASE)", **kind_attrs})
                enc = {v: {"chunks": tuple(chunk if d == "frame" else ds.sizes[d] for d in ds[v].dims)}
                       for v in ds.variables if "frame" in ds[v].dims}
                ds.to_zarr(tmp, mode="w-", consolidated=False, zarr_format=3, encoding=enc)
                store_attrs = dict(ds.attrs)
            else:
                ds.attrs = store_attrs   # appending writes the block's attrs over the store's
                ds.to_zarr(tmp, append_dim="frame", consolidated=False, zarr_format=3)
            n += len(rows)
        import zarr

        g = zarr.open_group(tmp, mode="r+")
        if not configurations:
            time_fs = np.asarray(g["time"][:])
            if n > 1 and np.any(np.diff(time_fs) <= 0):
                f = int(np.flatnonzero(np.diff(time_fs) <= 0)[0]) + 1
                raise IngestError(f"{path}: time of frame {f} ({time_fs[f]} fs) is not after frame {f - 1}")
            interval = float(np.median(np.diff(time_fs))) if n > 1 else float("nan")
            g.attrs["frame_interval_fs"] = interval
            step = np.asarray(g["step"][:])
            g.attrs["timestep_fs"] = float(np.median(np.diff(time_fs) / np.diff(step))) if n > 1 else float("nan")
            if not has_forces:
                if n < 3:
                    raise IngestError(f"{path}: accelerations from velocities need >= 3 frames, found {n}")
                ds = xr.open_zarr(tmp, consolidated=False)
                acc = ds["velocities"].differentiate("time", edge_order=2).rename("accelerations")
                acc.attrs = {"units": UNITS["accelerations"]}
                acc_ds = acc.to_dataset()
                acc_ds.attrs = dict(g.attrs)
                acc_ds.to_zarr(tmp, mode="a", consolidated=False)
    notes = ((f"no velocities: stored as a configuration set of {n} independent configurations (no time axis, "
              "split by a seeded shuffle when fitted)",) if configurations else ())
    return IngestReport(out=out, frames=n, natoms=natoms, notes=notes, kinetic_energy_max_rel_error=None,
                        acceleration_source="forces / masses" if has_forces else "velocity differences",
                        bytes_read=path.stat().st_size, seconds=_time.perf_counter() - t0)


def write_extxyz(store, path: str | Path, overwrite: bool = False) -> Path:
    """Write a trajectory store (or Dataset) as extended xyz (positions, momenta, masses, forces,
    energy, cell, time and step per frame), atomically."""
    import ase
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    ds = store if isinstance(store, xr.Dataset) else open_trajectory(store)
    path = Path(path)
    species = [str(s) for s in ds["species"].values]
    masses = ds["masses"].values
    has_forces = "forces" in ds
    has_energy = "potential_energy" in ds
    with atomic_output(path, overwrite=overwrite) as tmp:
        with open(tmp, "w") as fh:
            for a in range(0, ds.sizes["frame"], 256):
                blk = ds.isel(frame=slice(a, a + 256)).compute()
                cells = blk["cell"].values
                for i in range(blk.sizes["frame"]):
                    cell = cells if cells.ndim == 2 else cells[i]
                    atoms = ase.Atoms(species, positions=blk["positions"].values[i], cell=cell, pbc=True)
                    atoms.set_masses(masses)
                    if "velocities" in blk:          # a configuration set has neither velocities nor time
                        atoms.set_velocities(blk["velocities"].values[i] / ASE_VELOCITY_TO_ANGSTROM_PER_FS)
                    if "time" in blk.coords:
                        atoms.info["time"] = float(blk["time"].values[i])
                        atoms.info["step"] = int(blk["step"].values[i])
                    if has_forces or has_energy:
                        atoms.calc = SinglePointCalculator(
                            atoms, forces=blk["forces"].values[i] if has_forces else None,
                            energy=float(blk["potential_energy"].values[i]) if has_energy else None)
                    ase.io.write(fh, atoms, format="extxyz")
    return path
