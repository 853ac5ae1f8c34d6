"""The one trajectory schema, atomic zarr stores, and store summaries.

A trajectory is an :class:`xarray.Dataset` with dims ``(frame, atom, xyz)`` (plus
``cell_vector`` for the cell):

================== ======================== ==============
variable           dims                     units
================== ======================== ==============
positions          frame, atom, xyz         angstrom
velocities         frame, atom, xyz         angstrom/fs
forces             frame, atom, xyz         eV/angstrom    (when written)
accelerations      frame, atom, xyz         angstrom/fs^2  (derived)
masses             atom                     amu
cell               cell_vector, xyz         angstrom       (or frame, cell_vector, xyz)
kinetic_energy     frame                    eV             (from the velocities)
temperature        frame                    K              (from the velocities)
potential_energy   frame                    eV             (when known)
conserved_energy   frame                    eV             (when known)
================== ======================== ==============

Coordinates: ``step`` (frame; the MD step index), ``time`` (frame, fs),
``species`` (atom; variable-length strings), ``xyz`` and ``cell_vector`` labels.
Every variable has ``attrs["units"]``. Dataset attrs hold the schema version,
``timestep_fs``, ``frame_interval_fs``, the source files (path, role, size,
sha256) and how derived quantities were made.

Stores are zarr v3, float64, chunked along ``frame`` only, written to a
temporary path and renamed into place on success.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import dask.array as da
import numpy as np
import xarray as xr

from ..files import check_output_parent
from .. import thermo
from ..errors import UserError

SCHEMA = "ensemble.trajectory/1"

UNITS = {
    "positions": "angstrom",
    "velocities": "angstrom/fs",
    "forces": "eV/angstrom",
    "accelerations": "angstrom/fs^2",
    "masses": "amu",
    "cell": "angstrom",
    "time": "fs",
    "step": "1",
    "species": "none",
    "xyz": "none",
    "cell_vector": "none",
    "kinetic_energy": "eV",
    "temperature": "K",
    "potential_energy": "eV",
    "conserved_energy": "eV",
}

#: size of one chunk of ``positions`` that :func:`default_chunk_frames` aims for
DEFAULT_CHUNK_BYTES = 4 * 2**20


class StoreError(UserError, ValueError):
    """A store is missing, malformed, or would overwrite something."""


def default_chunk_frames(n_atoms: int, target_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Frames per chunk so that one chunk of a (frame, atom, xyz) float64 array is at most
    ``target_bytes`` (4 MiB by default: 455 frames for 384 atoms, 3640 for 48 atoms)."""
    return max(1, int(target_bytes // (n_atoms * 3 * 8)))


def kinetic_energy_ev(velocities: np.ndarray, masses: np.ndarray) -> np.ndarray:
    """Kinetic energy (eV) per frame from velocities (frame, atom, xyz; Å/fs) and masses (amu)."""
    return np.asarray(thermo.kinetic_energy(velocities, masses))


def temperature_k(kinetic_ev: np.ndarray, n_atoms: int) -> np.ndarray:
    """Instantaneous temperature (K) with 3N - 3 degrees of freedom (centre of mass fixed, as CP2K)."""
    return np.asarray(thermo.temperature(kinetic_ev, thermo.degrees_of_freedom(n_atoms)))


def frame_block(*, step, time_fs, positions, velocities, masses, forces=None, accelerations=None,
                potential_energy=None, conserved_energy=None, cell=None) -> xr.Dataset:
    """One block of frames in the schema, with kinetic energy and temperature from the velocities.

    Arrays are (frame, atom, xyz) in Å, Å/fs, eV/Å, Å/fs^2; energies (frame,) in eV; ``cell``
    (frame, cell_vector, xyz) only when it varies. ``accelerations`` default to forces / masses.
    A configuration set (frames without a time axis) passes ``velocities=None`` and ``time_fs=None``:
    no velocities, kinetic energy, temperature or time are written.
    """
    from ..units import EV_PER_ANGSTROM_AMU_TO_ANGSTROM_PER_FS2

    fax = ("frame", "atom", "xyz")
    data = {"positions": (fax, positions)}
    if velocities is not None:
        data["velocities"] = (fax, velocities)
    if forces is not None:
        data["forces"] = (fax, forces)
        if accelerations is None:
            accelerations = forces / masses[None, :, None] * EV_PER_ANGSTROM_AMU_TO_ANGSTROM_PER_FS2
    if accelerations is not None:
        data["accelerations"] = (fax, accelerations)
    if velocities is not None:
        ke = kinetic_energy_ev(velocities, masses)
        data["kinetic_energy"] = (("frame",), ke)
        data["temperature"] = (("frame",), temperature_k(ke, masses.shape[0]))
    if potential_energy is not None:
        data["potential_energy"] = (("frame",), np.asarray(potential_energy, dtype=float))
    if conserved_energy is not None:
        data["conserved_energy"] = (("frame",), np.asarray(conserved_energy, dtype=float))
    if cell is not None:
        data["cell"] = (("frame", "cell_vector", "xyz"), cell)
    coords = {"step": ("frame", np.asarray(step, dtype=np.int64))}
    if time_fs is not None:
        coords["time"] = ("frame", np.asarray(time_fs, dtype=float))
    ds = xr.Dataset(data, coords=coords)
    for name in ds.variables:
        ds[name].attrs["units"] = UNITS[name]
    return ds


def with_static(block: xr.Dataset, *, species, masses, cell, attrs: dict, mass_source: str = "") -> xr.Dataset:
    """``block`` plus the per-atom / per-store variables and attrs: the template of a store."""
    out = block.assign(masses=xr.Variable(("atom",), np.asarray(masses, dtype=float),
                                          {"units": UNITS["masses"], "source": mass_source}))
    if cell is not None and "cell" not in block:
        out = out.assign(cell=xr.Variable(("cell_vector", "xyz"), np.asarray(cell, dtype=float),
                                          {"units": UNITS["cell"]}))
    out = out.assign_coords(
        species=xr.Variable(("atom",), np.array([str(s) for s in species], dtype=object),
                            {"units": UNITS["species"]}),
        xyz=xr.Variable(("xyz",), np.array(["x", "y", "z"], dtype=object), {"units": "none"}),
        cell_vector=xr.Variable(("cell_vector",), np.array(["a", "b", "c"], dtype=object), {"units": "none"}))
    out.attrs = {"schema": SCHEMA, **attrs}
    return out


@contextlib.contextmanager
def atomic_output(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; rename it to ``out`` only if the block succeeds.

    On any exception the temporary path is removed and ``out`` is untouched. With
    ``overwrite`` an existing ``out`` is replaced only after the new one is complete.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise StoreError(f"{out} already exists; choose another --out or pass --overwrite")
    check_output_parent(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def atomic_write_text(out: str | Path, text: str) -> Path:
    """Write a text file atomically: a temporary file beside ``out``, then rename over it."""
    out = Path(out)
    check_output_parent(out)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(text)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _frame_encoding(ds: xr.Dataset, chunk_frames: int) -> dict:
    enc = {}
    for name, var in ds.variables.items():
        if "frame" in var.dims:
            enc[name] = {"chunks": tuple(chunk_frames if d == "frame" else ds.sizes[d] for d in var.dims)}
    return enc


def create_store(path: Path, template: xr.Dataset, n_frames: int, chunk_frames: int) -> None:
    """Lay out a store for ``n_frames`` frames shaped like ``template`` (a 1-frame dataset).

    Variables without a ``frame`` dim are written now; frame variables are created
    (filled later by :func:`write_frames`) with chunks of ``chunk_frames`` frames.
    """
    data_vars = {}
    for name, var in template.data_vars.items():
        if "frame" in var.dims:
            shape = tuple(n_frames if d == "frame" else template.sizes[d] for d in var.dims)
            chunks = tuple(chunk_frames if d == "frame" else template.sizes[d] for d in var.dims)
            data_vars[name] = xr.Variable(var.dims, da.zeros(shape, chunks=chunks, dtype=var.dtype),
                                          attrs=var.attrs)
        else:
            data_vars[name] = var
    coords = {}
    for name, var in template.coords.items():
        if "frame" in var.dims:
            coords[name] = xr.Variable(var.dims, da.zeros((n_frames,), chunks=(chunk_frames,),
                                                          dtype=var.dtype), attrs=var.attrs)
        else:
            coords[name] = var
    full = xr.Dataset(data_vars, coords=coords, attrs=template.attrs)
    full.to_zarr(path, mode="w-", compute=False, consolidated=False, zarr_format=3,
                 encoding=_frame_encoding(full, chunk_frames))


def write_frames(path: Path, block: xr.Dataset, start: int) -> None:
    """Write the frame variables of ``block`` at frames ``start:start + len(block.frame)``."""
    keep = [n for n, v in block.variables.items() if "frame" in v.dims]
    sub = block[[n for n in keep if n in block.data_vars]]
    sub = sub.assign_coords({n: block[n] for n in keep if n in block.coords})
    sub = sub.drop_vars([n for n in sub.variables if "frame" not in sub[n].dims])
    sub.attrs = {}
    sub.to_zarr(path, region={"frame": slice(start, start + block.sizes["frame"])},
                consolidated=False, zarr_format=3)


def open_zarr(path: str | Path, **kwargs) -> xr.Dataset:
    """``xr.open_zarr`` of a zarr v3 store written by this package: consolidated metadata when the
    store has it (every store written now), else the per-array metadata (stores of earlier versions)."""
    try:
        return xr.open_zarr(path, consolidated=True, zarr_format=3, **kwargs)
    except ValueError as exc:
        if "onsolidated metadata" not in str(exc):
            raise
    return xr.open_zarr(path, consolidated=False, zarr_format=3, **kwargs)


def write_zarr(ds: xr.Dataset, path: str | Path, **kwargs) -> None:
    """``ds.to_zarr`` as zarr v3 with consolidated metadata (so plain ``xr.open_zarr`` opens it
    without a warning). zarr-python notes that consolidated metadata is an extension of the v3
    specification; xarray and zarr-python read it, so that note is silenced here."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        ds.to_zarr(path, consolidated=True, zarr_format=3, **kwargs)


def open_trajectory(path: str | Path) -> xr.Dataset:
    """Open a trajectory store lazily (dask arrays chunked as stored)."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such store")
    try:
        ds = open_zarr(path)
    except Exception as exc:  # zarr/xarray raise many types for a non-store
        raise StoreError(f"{path}: not a readable zarr v3 store ({exc})") from exc
    if ds.attrs.get("schema") != SCHEMA:
        raise StoreError(f"{path}: attrs['schema'] is {ds.attrs.get('schema')!r}; expected {SCHEMA!r} "
                         "(not a trajectory written by ensemble)")
    missing = [name for name in ("positions", "species", "cell", "masses") if name not in ds.variables]
    if missing:
        raise StoreError(f"{path}: the trajectory has no {', '.join(repr(m) for m in missing)}; "
                         "expected positions, species, cell and masses (see the trajectory schema)")
    # small coordinates in memory (species as str objects), so grouping and selection need no compute
    try:
        small = {name: ds[name].load() for name in ("step", "time") if name in ds.coords}
        small["species"] = ds["species"].copy(data=np.array([str(s) for s in ds["species"].values], dtype=object))
    except Exception as exc:  # a missing or corrupt chunk of a coordinate
        raise StoreError(f"{path}: cannot read its coordinates ({type(exc).__name__}: {exc})") from None
    return _strict(ds.assign_coords(small), path)


#: per-frame arrays read strictly: a missing or unreadable chunk is an error, never fill values
STRICT_VARIABLES = ("positions", "velocities", "forces", "accelerations", "kinetic_energy", "temperature")


class _StrictChunks:
    """Array-like over one stored (frame, ...) variable, for ``dask.array.from_array``: every read
    checks that the chunk files exist (zarr would return fill values for a missing one) and turns
    a failed read (e.g. a corrupt, undecompressable chunk) into a StoreError naming the store,
    the variable and the frames."""

    def __init__(self, path: Path, name: str, array):
        self.path, self.name, self.array = Path(path), name, array
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.chunk_frames = int(array.chunks[0])

    def _chunk_files(self, c: int):
        import itertools

        grid = [range(-(-n // k)) for n, k in zip(self.shape[1:], self.array.chunks[1:])]
        for rest in itertools.product(*grid):
            yield self.path.joinpath(self.name, "c", str(c), *map(str, rest))

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        frames = key[0] if isinstance(key[0], slice) else slice(int(key[0]), int(key[0]) + 1)
        start, stop, _ = frames.indices(self.shape[0])
        if stop > start:
            for c in range(start // self.chunk_frames, (stop - 1) // self.chunk_frames + 1):
                chunk = next((f for f in self._chunk_files(c) if not f.exists()), None)
                if chunk is not None:
                    lo, hi = c * self.chunk_frames, min((c + 1) * self.chunk_frames, self.shape[0]) - 1
                    raise StoreError(f"{self.path}: variable {self.name!r}, frames {lo}..{hi}: the chunk file "
                                     f"{chunk.relative_to(self.path)} is missing; the store is incomplete or damaged")
        try:
            return np.asarray(self.array[key])
        except Exception as exc:
            raise StoreError(f"{self.path}: variable {self.name!r}, frames {start}..{stop - 1} cannot be read "
                             f"({type(exc).__name__}: {exc}); the store is damaged") from None


def _strict(ds: xr.Dataset, path: Path) -> xr.Dataset:
    import zarr

    group = zarr.open_group(str(path), mode="r")
    out = {}
    for name in STRICT_VARIABLES:
        if name in ds.data_vars and ds[name].dims and ds[name].dims[0] == "frame":
            arr = group[name]
            data = da.from_array(_StrictChunks(path, name, arr), chunks=arr.chunks, asarray=False,
                                 meta=np.empty((0,) * arr.ndim, dtype=arr.dtype), name=f"strict-{path}-{name}")
            out[name] = ds[name].copy(data=data)
    return ds.assign(out)


def cell_lengths_angles(cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lengths (Å) and angles alpha, beta, gamma (degrees) of cell vectors (rows)."""
    cell = np.asarray(cell, dtype=float)
    lengths = np.linalg.norm(cell, axis=-1)

    def ang(u, v):
        return np.degrees(np.arccos(np.clip(np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v), -1, 1)))

    return lengths, np.array([ang(cell[1], cell[2]), ang(cell[0], cell[2]), ang(cell[0], cell[1])])


def summarize(ds: xr.Dataset) -> dict:
    """Numbers that describe a trajectory (computed lazily with dask where large)."""
    species, counts = np.unique([str(x) for x in ds["species"].values], return_counts=True)
    configurations = bool(ds.attrs.get("configuration_set", False))
    time = ds["time"].values if "time" in ds.coords else np.full(ds.sizes["frame"], np.nan)
    if "temperature" in ds:
        temp = ds["temperature"]
        t_mean, t_std = (float(x) for x in da.compute(temp.data.mean(), temp.data.std()))
    else:
        t_mean = t_std = float("nan")
    cell = ds["cell"].values
    cell0 = cell if cell.ndim == 2 else cell[0]
    lengths, angles = cell_lengths_angles(cell0)
    out = {
        "atoms": int(ds.sizes["atom"]),
        "species_counts": {str(s): int(c) for s, c in zip(species, counts)},
        "frames": int(ds.sizes["frame"]),
        "steps": [int(ds["step"].values[0]), int(ds["step"].values[-1])],
        "time_fs": [float(time[0]), float(time[-1])],
        "frame_interval_fs": float(ds.attrs.get("frame_interval_fs", np.nan)),
        "timestep_fs": float(ds.attrs.get("timestep_fs", np.nan)),
        "temperature_K": {"mean": t_mean, "std": t_std},
        "cell_lengths_angstrom": lengths.tolist(),
        "cell_angles_deg": angles.tolist(),
        "cell_varies": bool(cell.ndim == 3 and not np.allclose(cell, cell[:1])),
        "configuration_set": configurations,
        "variables": sorted(str(v) for v in ds.data_vars),
        "chunk_frames": int(ds["positions"].encoding.get("chunks", (ds.sizes["frame"],))[0]),
        "acceleration_source": ds.attrs.get("acceleration_source", "unknown"),
    }
    if "kinetic_energy_check" in ds.attrs:
        out["kinetic_energy_check"] = ds.attrs["kinetic_energy_check"]
    if configurations:          # no time claims: null rather than NaN in JSON
        out.update(time_fs=None, frame_interval_fs=None, timestep_fs=None, temperature_K=None)
    out["provenance"] = provenance(ds)
    return out


#: store attrs that say where a store came from and how it was made
PROVENANCE_ATTRS = ("title", "status", "created_by", "source_format", "source_files", "cell_source", "mass_source",
                    "acceleration_source", "frame_selection", "reference_run", "initial_state", "ensemble_member",
                    "model_provenance", "simulation_settings")


def provenance(ds: xr.Dataset) -> dict:
    """Where a store came from: its source files (path, role, size, sha256), the code and settings
    that made it (JSON-encoded attrs decoded)."""
    import json

    out = {}
    for key in PROVENANCE_ATTRS:
        if key in ds.attrs:
            value = ds.attrs[key]
            if isinstance(value, str) and value[:1] in "{[":
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            out[key] = value
    return out


def format_summary(s: dict, name: str = "") -> str:
    """Human-readable text of :func:`summarize`'s result."""
    sp = ", ".join(f"{k} {v}" for k, v in s["species_counts"].items())
    a, b, c = s["cell_lengths_angstrom"]
    al, be, ga = s["cell_angles_deg"]
    if s.get("configuration_set"):
        lines = [f"configurations {name}",
                 f"atoms         {s['atoms']} ({sp})",
                 f"frames        {s['frames']} independent configurations ({s['chunk_frames']} per chunk)",
                 "time          none (a configuration set: no time axis, no velocities, no temperature)"]
    else:
        lines = [
            f"trajectory    {name}",
            f"atoms         {s['atoms']} ({sp})",
            f"frames        {s['frames']} (steps {s['steps'][0]}..{s['steps'][1]}, "
            f"{s['chunk_frames']} frames per chunk)",
            f"time          {s['time_fs'][0]:.3f} .. {s['time_fs'][1]:.3f} fs "
            f"(timestep {s['timestep_fs']:g} fs, a frame every {s['frame_interval_fs']:g} fs)",
            f"temperature   {s['temperature_K']['mean']:.2f} +- {s['temperature_K']['std']:.2f} K "
            "(mean +- std over frames, 3N-3 degrees of freedom)"]
    lines += [
        f"cell          a b c = {a:.4f} {b:.4f} {c:.4f} Å, angles = {al:.2f} {be:.2f} {ga:.2f} deg"
        + (" (varies; first frame shown)" if s["cell_varies"] else ""),
        f"variables     {', '.join(s['variables'])}",
        f"accelerations {s['acceleration_source']}",
    ]
    prov = s.get("provenance", {})
    if prov.get("title") or prov.get("created_by"):
        lines.append(f"made by       {prov.get('created_by', '?')}: {prov.get('title', '')}"
                     + (f" (status: {prov['status']})" if "status" in prov else ""))
    for f in prov.get("source_files", [])[:6]:
        digest = f" sha256 {f['sha256'][:12]}..." if f.get("sha256") else ""
        lines.append(f"source        {f.get('role', '')} {f.get('path', '')} "
                     f"({f.get('size_bytes', '?')} bytes{digest})")
    ke = s.get("kinetic_energy_check")
    if ke:
        lines.append(f"KE check      max relative error {ke['max_rel_error']:.2e} against "
                     f"{ke['reference']} ({ke['frames']} frames)")
    return "\n".join(lines)
