"""Ingest CP2K MD output (xyz trajectories, .ener, .cell, input / restart) into a zarr store.

Two passes over each xyz file, both streaming in fixed-size byte blocks so a
multi-GB file never has to fit in memory:

1. :func:`index_xyz` walks the frame structure (numba ``scan_frames``), records
   every frame's byte offset, CP2K step ``i =``, time and energy, hashes the file,
   and reports structural errors (atom counts, headers, truncation) with line
   numbers before any output exists.
2. :func:`ingest_cp2k` keeps the steps present in every file, then reads them
   back block by block (numba ``parse_frames``), converts units once, checks
   values (finite, species order, kinetic energy against the .ener file) and
   writes each block into a temporary zarr store that is renamed into place only
   when everything succeeded.
"""

from __future__ import annotations

import hashlib
import time as _time
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Callable

import numpy as np
import xarray as xr

from .. import __version__
from ..elements import default_mass
from ..units import (
    BOHR_PER_AU_TIME_TO_ANGSTROM_PER_FS,
    CP2K_HARTREE_TO_EV,
    HARTREE_PER_BOHR_TO_EV_PER_ANGSTROM,
)
from . import xyz_kernels as K
from .cp2k_input import InputError, cell_from_input, masses_from_input, read_input
from .store import atomic_output, create_store, default_chunk_frames, frame_block, with_static, write_frames
from ..errors import UserError

__all__ = ["IngestError", "Cp2kFiles", "XyzIndex", "find_cp2k_files", "index_xyz", "read_frames",
           "read_ener", "read_cell_file", "ingest_cp2k", "IngestReport"]

#: bytes read per block while scanning / parsing
BLOCK_BYTES = 32 * 2**20
#: largest tolerated relative difference between our and CP2K's kinetic energy
KE_REL_TOLERANCE = 1e-3


class IngestError(UserError, ValueError):
    """Input files are missing, inconsistent or malformed. The message names the file and line."""


# --------------------------------------------------------------------------- discovery
@dataclass(frozen=True)
class Cp2kFiles:
    """The files of one CP2K MD run."""

    project: str
    positions: Path
    velocities: Path
    forces: Path | None = None
    energies: Path | None = None
    cell: Path | None = None
    inputs: tuple[Path, ...] = ()


def _project_of_input(path: Path) -> str | None:
    try:
        root = read_input(path)
    except (InputError, OSError):
        return None
    glob = root.section("GLOBAL")
    if glob is None:
        return None
    return glob.keyword("PROJECT") or glob.keyword("PROJECT_NAME")


def find_cp2k_files(source: str | Path, input_file: str | Path | None = None) -> Cp2kFiles:
    """Find a run's files from a directory, a project prefix (``dir/PROJECT``) or its -pos file.

    Raises
    ------
    IngestError
        When there is no ``-pos-1.xyz`` / ``-vel-1.xyz``, or a directory holds several projects.
    """
    source = Path(source)
    if source.is_dir():
        found = sorted(source.glob("*-pos-1.xyz"))
        if not found:
            raise IngestError(f"{source}: no CP2K trajectory (*-pos-1.xyz) in this directory")
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise IngestError(f"{source}: several projects ({names}); pass a project prefix "
                              f"such as {found[0].with_name(found[0].name[:-len('-pos-1.xyz')])}")
        prefix = found[0].with_name(found[0].name[: -len("-pos-1.xyz")])
    elif source.name.endswith("-pos-1.xyz"):
        prefix = source.with_name(source.name[: -len("-pos-1.xyz")])
    else:
        prefix = source
    project = prefix.name
    pos = prefix.with_name(f"{project}-pos-1.xyz")
    vel = prefix.with_name(f"{project}-vel-1.xyz")
    for p, what in ((pos, "positions"), (vel, "velocities")):
        if not p.is_file():
            raise IngestError(f"{p}: missing CP2K {what} file (expected {p.name} beside the others; "
                              f"print it with MOTION/PRINT/{'TRAJECTORY' if what == 'positions' else 'VELOCITIES'})")

    def opt(name):
        p = prefix.with_name(name)
        return p if p.is_file() else None

    inputs: list[Path] = []
    if input_file is not None:
        if not Path(input_file).is_file():
            raise IngestError(f"{input_file}: input file not found")
        inputs.append(Path(input_file))
    restart = opt(f"{project}-1.restart")
    if restart:
        inputs.append(restart)
    for inp in sorted(prefix.parent.glob("*.inp")):
        if _project_of_input(inp) == project and inp not in inputs:
            inputs.append(inp)
    if not inputs:
        lone = sorted(prefix.parent.glob("*.inp"))
        if len(lone) == 1:
            inputs.append(lone[0])
    return Cp2kFiles(project=project, positions=pos, velocities=vel,
                     forces=opt(f"{project}-frc-1.xyz"), energies=opt(f"{project}-1.ener"),
                     cell=opt(f"{project}-1.cell"), inputs=tuple(inputs))


# --------------------------------------------------------------------------- xyz index
@dataclass(frozen=True)
class XyzIndex:
    """Frame layout of one xyz file (from :func:`index_xyz`).

    Attributes
    ----------
    offsets : int64 (n_frames + 1,)
        Byte offset of each frame's first line; the last entry is the file's end.
    steps : int64 (n_frames,)
        CP2K step index ``i =`` of each frame.
    times_fs, energies_hartree : float64 (n_frames,)
        Header ``time =`` and ``E =`` (NaN when absent).
    """

    path: Path
    natoms: int
    species: tuple[str, ...]
    offsets: np.ndarray
    steps: np.ndarray
    times_fs: np.ndarray
    energies_hartree: np.ndarray
    size: int
    sha256: str

    @property
    def n_frames(self) -> int:
        return int(self.steps.shape[0])

    def line_of(self, frame: int, line_in_frame: int = 0) -> int:
        """1-based line number of ``line_in_frame`` (0 = atom count) of frame ``frame``."""
        return frame * (self.natoms + 2) + line_in_frame + 1


def _read_first_frame(path: Path) -> tuple[int, tuple[str, ...]]:
    with open(path, "rb") as fh:
        first = fh.readline()
        try:
            natoms = int(first.strip())
        except ValueError:
            raise IngestError(f"{path}:1: expected the number of atoms, found {first[:60]!r}") from None
        if natoms <= 0:
            raise IngestError(f"{path}:1: number of atoms must be positive, found {natoms}")
        fh.readline()
        species = []
        for a in range(natoms):
            line = fh.readline()
            if not line:
                raise IngestError(f"{path}:{a + 3}: file ends inside the first frame: expected "
                                  f"{natoms} atom lines, found {a}")
            parts = line.split()
            if not parts:
                raise IngestError(f"{path}:{a + 3}: empty line where atom {a + 1} was expected")
            species.append(parts[0].decode())
    return natoms, tuple(species)


def _species_codes(species: tuple[str, ...]) -> np.ndarray:
    codes = np.zeros((len(species), 4), dtype=np.uint8)
    for i, s in enumerate(species):
        b = s.encode()[:4]
        codes[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    return codes


def index_xyz(path: str | Path, block_bytes: int = BLOCK_BYTES) -> XyzIndex:
    """Scan an xyz file's frame structure in blocks; see :class:`XyzIndex`.

    Raises
    ------
    IngestError
        Wrong atom-count line, header that is not CP2K's ``i = .., time = .., E = ..``,
        or a file that ends inside a frame; the message gives the line number.
    """
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"{path}: no such file")
    natoms, species = _read_first_frame(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    offs, steps, times, energies = [], [], [], []
    base = 0  # file offset of buf[0]
    carry = b""
    nframes = 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(block_bytes)
            h.update(chunk)
            final = len(chunk) < block_bytes
            buf = carry + chunk
            arr = np.frombuffer(buf, dtype=np.uint8)
            cap = len(buf) // (natoms * 6 + 10) + 2
            o = np.empty(cap, np.int64)
            s = np.empty(cap, np.int64)
            t = np.empty(cap)
            e = np.empty(cap)
            n, consumed, status, lines = K.scan_frames(arr, natoms, final, o, s, t, e)
            offs.append(o[:n] + base)
            steps.append(s[:n].copy())
            times.append(t[:n].copy())
            energies.append(e[:n].copy())
            nframes += n
            if status != K.OK:
                line = nframes * (natoms + 2) + 1
                if status == -1:
                    raise IngestError(
                        f"{path}:{line + lines}: file ends inside frame {nframes} (after step "
                        f"{int(steps[-1][-1]) if nframes and len(steps[-1]) else 'none'}): expected "
                        f"{natoms} atom lines, found {max(lines - 2, 0)} (truncated file?)")
                if status == K.BAD_ATOM_COUNT:
                    got = bytes(arr[consumed: consumed + 40]).split(b"\n")[0]
                    raise IngestError(f"{path}:{line}: expected the atom count {natoms} at the start "
                                      f"of frame {nframes}, found {got!r}")
                got = bytes(arr[consumed: consumed + 200]).split(b"\n")[1] if b"\n" in bytes(
                    arr[consumed: consumed + 200]) else b""
                raise IngestError(f"{path}:{line + 1}: expected a CP2K frame header "
                                  f"' i = STEP, time = T, E = E', found {got[:80]!r}")
            base += consumed
            carry = buf[consumed:]
            if final:
                break
    return XyzIndex(path=path, natoms=natoms, species=species,
                    offsets=np.append(np.concatenate(offs), size).astype(np.int64),
                    steps=np.concatenate(steps), times_fs=np.concatenate(times),
                    energies_hartree=np.concatenate(energies), size=size, sha256=h.hexdigest())


_ERRORS = {
    K.BAD_NUMBER: "a field that is not a number",
    K.NON_FINITE: "a non-finite number (NaN, Infinity or Fortran '****')",
    K.WRONG_SPECIES: "a different species than the first frame",
    K.MISSING_FIELD: "fewer than 4 fields (species x y z)",
    K.EXTRA_FIELD: "more than 4 fields (species x y z)",
}


def read_frames(index: XyzIndex, frames: np.ndarray) -> np.ndarray:
    """Values of the given frames (sorted indices into the file) as float64 (k, natoms, 3),
    in the file's own units. Reads only the byte range those frames span."""
    frames = np.asarray(frames, dtype=np.int64)
    out = np.empty((len(frames), index.natoms, 3))
    if len(frames) == 0:
        return out
    lo, hi = int(index.offsets[frames[0]]), int(index.offsets[frames[-1] + 1])
    with open(index.path, "rb") as fh:
        fh.seek(lo)
        buf = np.frombuffer(fh.read(hi - lo), dtype=np.uint8)
    status, f, a = K.parse_frames(buf, index.offsets[frames] - lo, index.natoms,
                                  _species_codes(index.species), out)
    if status != K.OK:
        frame = int(frames[f])
        line = index.line_of(frame, 2 + a)
        p = int(index.offsets[frame])
        with open(index.path, "rb") as fh:
            fh.seek(p)
            text = fh.read(int(index.offsets[frame + 1]) - p).split(b"\n")
        found = text[2 + a].decode(errors="replace").strip() if len(text) > 2 + a else ""
        extra = (f" (expected species {index.species[a]!r})" if status == K.WRONG_SPECIES else "")
        raise IngestError(f"{index.path}:{line}: frame {frame} (step {int(index.steps[frame])}), "
                          f"atom {a + 1} has {_ERRORS.get(status, 'a parse error')}{extra}: {found!r}")
    return out


# --------------------------------------------------------------------------- .ener / .cell
def _read_table(path: Path, min_cols: int, what: str) -> np.ndarray:
    rows = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            parts = s.split()
            if len(parts) < min_cols:
                raise IngestError(f"{path}:{lineno}: expected {min_cols} columns ({what}), found "
                                  f"{len(parts)}: {s[:80]!r}")
            try:
                row = [float(x) for x in parts[:min_cols]]
            except ValueError:
                raise IngestError(f"{path}:{lineno}: non-numeric value in {s[:80]!r}") from None
            if not np.all(np.isfinite(row)):
                raise IngestError(f"{path}:{lineno}: non-finite value in {s[:80]!r}")
            rows.append(row)
    if not rows:
        raise IngestError(f"{path}: no data lines (expected {what})")
    return np.array(rows)


def read_ener(path: str | Path) -> dict[str, np.ndarray]:
    """CP2K ``.ener`` columns in package units: step, time_fs, kinetic_ev, temperature_k,
    potential_ev, conserved_ev."""
    t = _read_table(Path(path), 6, "step, time [fs], kinetic, temperature, potential, conserved")
    return {"step": t[:, 0].astype(np.int64), "time_fs": t[:, 1], "kinetic_ev": t[:, 2] * CP2K_HARTREE_TO_EV,
            "temperature_k": t[:, 3], "potential_ev": t[:, 4] * CP2K_HARTREE_TO_EV,
            "conserved_ev": t[:, 5] * CP2K_HARTREE_TO_EV}


def read_cell_file(path: str | Path) -> dict[str, np.ndarray]:
    """CP2K ``.cell`` file: step, time_fs and cell vectors (n, 3, 3) in Å (rows a, b, c)."""
    t = _read_table(Path(path), 11, "step, time, Ax Ay Az Bx By Bz Cx Cy Cz")
    return {"step": t[:, 0].astype(np.int64), "time_fs": t[:, 1], "cell": t[:, 2:11].reshape(-1, 3, 3)}


# --------------------------------------------------------------------------- ingest
@dataclass(frozen=True)
class IngestReport:
    """What an ingest did."""

    out: Path
    frames: int
    natoms: int
    notes: tuple[str, ...]
    kinetic_energy_max_rel_error: float | None
    acceleration_source: str
    bytes_read: int
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / self.seconds if self.seconds > 0 else float("inf")


def _check_increasing(index: XyzIndex) -> None:
    d = np.diff(index.steps)
    bad = np.flatnonzero(d <= 0)
    if bad.size:
        f = int(bad[0]) + 1
        raise IngestError(
            f"{index.path}:{index.line_of(f, 1)}: step i = {int(index.steps[f])} (frame {f}) does not "
            f"follow step {int(index.steps[f - 1])}: steps must strictly increase (a restarted run "
            "appended over frames already written?)")
    dt = np.diff(index.times_fs)
    bad = np.flatnonzero(dt <= 0)
    if bad.size:
        f = int(bad[0]) + 1
        raise IngestError(f"{index.path}:{index.line_of(f, 1)}: time {index.times_fs[f]} fs of frame {f} "
                          f"is not after {index.times_fs[f - 1]} fs: time must strictly increase")


def _resolve_cell(files: Cp2kFiles, cell: np.ndarray | None, steps: np.ndarray):
    """(cell array, per_frame, description)."""
    if cell is not None:
        cell = np.asarray(cell, dtype=float)
        if cell.shape == (3,):
            cell = np.diag(cell)
        if cell.shape != (3, 3):
            raise IngestError(f"--cell: expected 3 lengths or 9 numbers (Å), got shape {cell.shape}")
        return cell, False, "given by the user (--cell)"
    if files.cell is not None:
        c = read_cell_file(files.cell)
        pos = np.searchsorted(c["step"], steps)
        ok = (pos < len(c["step"])) & (c["step"][np.minimum(pos, len(c["step"]) - 1)] == steps)
        if np.allclose(c["cell"], c["cell"][0], rtol=0, atol=1e-10):
            return c["cell"][0], False, f"{files.cell.name}"
        if not ok.all():
            missing = steps[~ok][:5].tolist()
            raise IngestError(f"{files.cell}: the cell varies but steps {missing} are missing from it")
        return c["cell"][pos], True, f"{files.cell.name} (per frame)"
    for inp in files.inputs:
        try:
            got = cell_from_input(read_input(inp), source=str(inp))
        except InputError as exc:
            raise IngestError(str(exc)) from None
        if got is not None:
            return got, False, f"{inp.name} (&CELL)"
    raise IngestError(f"no cell found for project {files.project!r}: no {files.project}-1.cell, no "
                      "restart or input file with &CELL beside the trajectory; pass --cell A B C (Å) "
                      "or --input FILE.inp")


def _resolve_masses(files: Cp2kFiles, species: tuple[str, ...], masses: dict | None):
    given: dict[str, float] = {}
    source = "CP2K default element masses"
    for inp in files.inputs:
        try:
            got = masses_from_input(read_input(inp), source=str(inp))
        except InputError as exc:
            raise IngestError(str(exc)) from None
        if got:
            given.update(got)
            source = f"&KIND MASS in {inp.name}, CP2K defaults otherwise"
            break
    if masses:
        given.update(masses)
        source = "given by the user (--masses), CP2K defaults otherwise"
    out = np.empty(len(species))
    for i, s in enumerate(species):
        if s in given:
            out[i] = given[s]
        else:
            try:
                out[i] = default_mass(s)
            except (ValueError, KeyError):
                raise IngestError(f"{files.positions}: no mass known for atom label {s!r}; pass "
                                  f"--masses {s}=VALUE") from None
    return out, source


def ingest_cp2k(
    source: str | Path,
    out: str | Path,
    *,
    cell=None,
    masses: dict[str, float] | None = None,
    input_file: str | Path | None = None,
    chunk_frames: int | None = None,
    overwrite: bool = False,
    block_bytes: int = BLOCK_BYTES,
    progress: Callable[[int, int], None] | None = None,
    extra_attrs: dict | None = None,
) -> IngestReport:
    """Convert a CP2K MD output set into a trajectory store (see :mod:`ensemble.io.store`).

    Parameters
    ----------
    source : path
        Directory holding one run, a project prefix (``dir/PROJECT``) or its ``-pos-1.xyz``.
    out : path
        Zarr store to create (written to a temporary path, renamed on success).
    cell : array_like, optional
        3 edge lengths or a 3x3 matrix of cell vectors (Å); overrides files.
    masses : dict, optional
        amu per atom label; others use CP2K's defaults or the input's ``&KIND MASS``.
    input_file : path, optional
        CP2K input or restart file to read the cell / masses from.
    chunk_frames : int, optional
        Frames per zarr chunk (default :func:`~ensemble.io.store.default_chunk_frames`).
    progress : callable(done_frames, total_frames), optional
    extra_attrs : dict, optional
        JSON-serialisable attributes added to the store (e.g. how a reference run was made).

    Returns
    -------
    IngestReport
    """
    t0 = _time.perf_counter()
    files = find_cp2k_files(source, input_file)
    out = Path(out)
    if out.exists() and not overwrite:
        raise IngestError(f"{out} already exists; choose another --out or pass --overwrite")

    idx = {"positions": index_xyz(files.positions, block_bytes),
           "velocities": index_xyz(files.velocities, block_bytes)}
    if files.forces is not None:
        idx["forces"] = index_xyz(files.forces, block_bytes)
    ref = idx["positions"]
    for role, ix in idx.items():
        if ix.natoms != ref.natoms:
            raise IngestError(f"{ix.path}:1: {ix.natoms} atoms, but {ref.path.name} has {ref.natoms}")
        if ix.species != ref.species:
            a = next(i for i, (p, q) in enumerate(zip(ix.species, ref.species)) if p != q)
            raise IngestError(f"{ix.path}:{a + 3}: atom {a + 1} is {ix.species[a]!r} but "
                              f"{ref.species[a]!r} in {ref.path.name}: species order must match")
        _check_increasing(ix)
    ener = read_ener(files.energies) if files.energies is not None else None
    if ener is not None:
        bad = np.flatnonzero(np.diff(ener["step"]) <= 0)
        if bad.size:
            raise IngestError(f"{files.energies}: step {int(ener['step'][bad[0] + 1])} does not follow "
                              f"step {int(ener['step'][bad[0]])}: steps must strictly increase")

    step_sets = [ix.steps for ix in idx.values()] + ([ener["step"]] if ener is not None else [])
    steps = reduce(np.intersect1d, step_sets)
    if steps.size == 0:
        raise IngestError("no CP2K step i = is present in every file: "
                          + "; ".join(f"{ix.path.name} has {ix.steps[0]}..{ix.steps[-1]}" for ix in idx.values()))
    notes = []
    for role, ix in idx.items():
        if ix.n_frames != steps.size:
            notes.append(f"{ix.path.name}: kept {steps.size} of {ix.n_frames} frames (steps present "
                         "in every file)")
    if ener is not None and ener["step"].size != steps.size:
        notes.append(f"{files.energies.name}: kept {steps.size} of {ener['step'].size} rows")
    sel = {role: np.searchsorted(ix.steps, steps) for role, ix in idx.items()}
    time_fs = ref.times_fs[sel["positions"]]
    for role, ix in idx.items():
        diff = np.abs(ix.times_fs[sel[role]] - time_fs)
        if diff.max() > 1e-3:
            f = int(np.argmax(diff))
            raise IngestError(f"{ix.path}: step {int(steps[f])} is at time {ix.times_fs[sel[role]][f]} fs "
                              f"but at {time_fs[f]} fs in {ref.path.name}")
    esel = None
    if ener is not None:
        esel = np.searchsorted(ener["step"], steps)
        diff = np.abs(ener["time_fs"][esel] - time_fs)
        if diff.max() > 1e-3:
            f = int(np.argmax(diff))
            raise IngestError(f"{files.energies}: step {int(steps[f])} is at {ener['time_fs'][esel][f]} fs "
                              f"but at {time_fs[f]} fs in {ref.path.name}")
    if steps.size > 1:
        per_step = np.diff(time_fs) / np.diff(steps)
        timestep_fs = float(np.median(per_step))
        if np.abs(per_step - timestep_fs).max() > 1e-3 * max(timestep_fs, 1e-12) + 5e-4:
            raise IngestError(f"{ref.path}: time per MD step varies ({per_step.min():g}..{per_step.max():g} fs)")
        interval = np.diff(time_fs)
        frame_interval_fs = float(np.median(interval))
        uniform = bool(np.allclose(interval, frame_interval_fs, rtol=1e-6, atol=5e-4))
    else:
        timestep_fs = frame_interval_fs = float("nan")
        uniform = True

    cell_arr, cell_per_frame, cell_source = _resolve_cell(files, cell, steps)
    mass, mass_source = _resolve_masses(files, ref.species, masses)
    natoms, n = ref.natoms, int(steps.size)
    if chunk_frames is not None and int(chunk_frames) < 1:
        raise IngestError(f"chunk_frames must be >= 1, got {chunk_frames}")
    chunk = min(int(chunk_frames or default_chunk_frames(natoms)), n)
    has_forces = "forces" in idx
    if not has_forces and n < 3:
        raise IngestError(f"{files.velocities}: accelerations from velocities need >= 3 frames, found {n}")
    acc_source = ("forces / masses" if has_forces else
                  "finite differences of velocities in time (numpy.gradient: central inside, "
                  "second-order one-sided at the ends)")
    if not has_forces and not uniform:
        notes.append("frames are unevenly spaced in time: accelerations from velocity differences are "
                      "less accurate")

    source_files = [{"role": role, "path": str(ix.path.resolve()), "size_bytes": ix.size, "sha256": ix.sha256}
                    for role, ix in idx.items()]
    for role, p in (("energies", files.energies), ("cell", files.cell)):
        if p is not None:
            source_files.append({"role": role, "path": str(p.resolve()), "size_bytes": p.stat().st_size,
                                 "sha256": hashlib.sha256(p.read_bytes()).hexdigest()})
    for p in files.inputs:
        source_files.append({"role": "input", "path": str(p.resolve()), "size_bytes": p.stat().st_size})

    def block_dataset(a: int, b: int) -> tuple[xr.Dataset, np.ndarray]:
        pos = read_frames(idx["positions"], sel["positions"][a:b])
        # velocities with a one-frame halo, for finite-difference accelerations
        lo, hi = (a, b) if has_forces else (max(a - 1, 0), min(b + 1, n))
        vel_h = read_frames(idx["velocities"], sel["velocities"][lo:hi]) * BOHR_PER_AU_TIME_TO_ANGSTROM_PER_FS
        vel = vel_h[a - lo: a - lo + (b - a)]
        frc = acc = None
        if has_forces:
            frc = read_frames(idx["forces"], sel["forces"][a:b]) * HARTREE_PER_BOHR_TO_EV_PER_ANGSTROM
        else:
            acc = np.gradient(vel_h, time_fs[lo:hi], axis=0, edge_order=2)[a - lo: a - lo + (b - a)]
        if ener is not None:
            epot, econs = ener["potential_ev"][esel[a:b]], ener["conserved_ev"][esel[a:b]]
        elif np.isfinite(ref.energies_hartree).all():
            epot, econs = ref.energies_hartree[sel["positions"][a:b]] * CP2K_HARTREE_TO_EV, None
        else:
            epot = econs = None
        ds = frame_block(step=steps[a:b], time_fs=time_fs[a:b], positions=pos, velocities=vel, masses=mass,
                         forces=frc, accelerations=acc, potential_energy=epot, conserved_energy=econs,
                         cell=cell_arr[a:b] if cell_per_frame else None)
        return ds, ds["kinetic_energy"].values

    ke_max, ke_frames = 0.0, 0
    with atomic_output(out, overwrite=overwrite) as tmp:
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            block, ke = block_dataset(a, b)
            for name in ("positions", "velocities", "forces"):
                if name in block and not np.isfinite(block[name].values).all():
                    raise IngestError(f"{idx[name].path}: non-finite value after unit conversion "
                                      f"(frames {a}..{b - 1})")
            if ener is not None:
                ref_ke = ener["kinetic_ev"][esel[a:b]]
                rel = np.abs(ke - ref_ke) / np.maximum(np.abs(ref_ke), 1e-300)
                if rel.max() > KE_REL_TOLERANCE:
                    f = a + int(np.flatnonzero(rel > KE_REL_TOLERANCE)[0])
                    raise IngestError(
                        f"{files.velocities}: kinetic energy of step {int(steps[f])} from the velocities "
                        f"({ke[f - a]:.6f} eV) differs from {files.energies.name} ({ref_ke[f - a]:.6f} eV) "
                        f"by {rel[f - a]:.2e} relative (> {KE_REL_TOLERANCE:g}): wrong masses or units?")
                ke_max = max(ke_max, float(rel.max()))
                ke_frames += b - a
            if a == 0:
                template = with_static(block.isel(frame=slice(0, 1)), species=ref.species, masses=mass,
                                       cell=None if cell_per_frame else cell_arr, mass_source=mass_source, attrs={
                    "title": f"CP2K trajectory of project {files.project}",
                    "source_format": "cp2k-xyz",
                    "source_files": source_files,
                    "timestep_fs": timestep_fs,
                    "frame_interval_fs": frame_interval_fs,
                    "uniform_frame_interval": uniform,
                    "acceleration_source": acc_source,
                    "cell_source": cell_source,
                    "mass_source": mass_source,
                    "frame_selection": "; ".join(notes) if notes else "all frames of every file",
                    "temperature_dof": "3N - 3",
                    "created_by": f"ensemble {__version__} ingest",
                    **(extra_attrs or {}),
                })
                create_store(tmp, template, n, chunk)
            write_frames(tmp, block, a)
            if progress is not None:
                progress(b, n)
        if ener is not None:
            import zarr

            zarr.open_group(tmp, mode="r+").attrs["kinetic_energy_check"] = {
                "max_rel_error": ke_max, "frames": ke_frames, "tolerance": KE_REL_TOLERANCE,
                "reference": files.energies.name}
    bytes_read = sum(ix.size for ix in idx.values())
    return IngestReport(out=out, frames=n, natoms=natoms, notes=tuple(notes),
                        kinetic_energy_max_rel_error=ke_max if ener is not None else None,
                        acceleration_source=acc_source, bytes_read=bytes_read,
                        seconds=_time.perf_counter() - t0,
                        extra={"cell_source": cell_source, "mass_source": mass_source,
                               "timestep_fs": timestep_fs})
