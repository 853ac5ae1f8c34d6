"""Benchmarks that print figures (``ensemble bench ...``). Speed is measured here, not in tests."""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .elements import default_mass
from .units import (AMU_A2_PER_FS2_TO_EV, BOHR_PER_AU_TIME_TO_ANGSTROM_PER_FS, CP2K_HARTREE_TO_EV)

__all__ = ["write_synthetic_cp2k_run", "bench_ingest"]


def write_synthetic_cp2k_run(directory: str | Path, *, n_molecules: int, n_frames: int, seed: int = 0,
                             project: str = "synthetic", box_angstrom: float = 15.6404) -> dict:
    """Write CP2K-format ``-pos/-vel/-frc-1.xyz``, ``-1.ener`` and ``-1.cell`` files of random data.

    The numbers are not physics (random walks), but the layout is byte-for-byte CP2K's
    (``F20.10`` fields, `` i = ..., time = ..., E = ...`` headers) and the .ener kinetic
    energy matches the velocities, so the whole ingestion path runs on it. Returns the
    arrays written (in CP2K units) for the first and last frame, for checks.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    species = ["O", "H", "H"] * n_molecules
    natoms = len(species)
    masses = np.array([default_mass(s) for s in species])
    pos = rng.uniform(0, box_angstrom, size=(natoms, 3))
    line = "".join(f"{s:>3s} %19.10f %19.10f %19.10f\n" for s in species)
    files = {k: open(d / f"{project}-{k}-1.xyz", "w") for k in ("pos", "vel", "frc")}
    ener = open(d / f"{project}-1.ener", "w")
    ener.write("#     Step Nr.          Time[fs]        Kin.[a.u.]          Temp[K]            Pot.[a.u.]"
               "        Cons Qty[a.u.]        UsedTime[s]\n")
    first = last = None
    try:
        for f in range(n_frames):
            vel = rng.normal(scale=4e-4, size=(natoms, 3))
            frc = rng.normal(scale=2e-2, size=(natoms, 3))
            pos = pos + vel * BOHR_PER_AU_TIME_TO_ANGSTROM_PER_FS * 0.5
            t = 0.5 * f
            epot = -17.0 + 0.01 * np.sin(f)
            ke_ev = 0.5 * AMU_A2_PER_FS2_TO_EV * np.sum(masses[:, None] * (vel * BOHR_PER_AU_TIME_TO_ANGSTROM_PER_FS) ** 2)
            head = f"{natoms:8d}\n i = {f:8d}, time = {t:12.3f}, E = {epot:20.10f}\n"
            for key, arr in (("pos", pos), ("vel", vel), ("frc", frc)):
                files[key].write(head + line % tuple(arr.ravel()))
            ke = ke_ev / CP2K_HARTREE_TO_EV
            temp = 2 * ke_ev / ((3 * natoms - 3) * 8.617333262e-5)
            ener.write(f"{f:10d} {t:17.6f} {ke:20.9f} {temp:20.9f} {epot:20.9f} {epot + ke:20.9f} {0.01:20.9f}\n")
            # rounded as written, so callers can compare exactly
            snap = {k: np.round(a, 10) for k, a in (("pos", pos), ("vel", vel), ("frc", frc))}
            if f == 0:
                first = snap
            last = snap
    finally:
        for fh in files.values():
            fh.close()
        ener.close()
    (d / f"{project}-1.cell").write_text(
        "#   Step   Time [fs]       Ax [Angstrom]       Ay [Angstrom]       Az [Angstrom]       Bx [Angstrom]"
        "       By [Angstrom]       Bz [Angstrom]       Cx [Angstrom]       Cy [Angstrom]       Cz [Angstrom]"
        "      Volume [Angstrom^3]\n"
        + f"{0:8d} {0.0:11.3f} " + " ".join(f"{x:19.10f}" for x in np.diag([box_angstrom] * 3).ravel())
        + f" {box_angstrom ** 3:24.10f}\n")
    return {"first": first, "last": last, "natoms": natoms, "project": project, "species": species}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_ingest(size_mb: float = 200.0, workdir: str | Path | None = None, n_molecules: int = 128) -> dict:
    """Time ``ingest_cp2k`` on a synthetic CP2K run whose -pos file is about ``size_mb`` MB.

    Prints MB/s over all xyz bytes (pos + vel + frc), for the whole ingest (scan, parse,
    unit conversion, checks, zarr write) on one core, and the peak resident memory.
    """
    from .io.cp2k import index_xyz, ingest_cp2k, read_frames

    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="ensemble-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    natoms = 3 * n_molecules
    frame_bytes = natoms * 64 + 60
    n_frames = max(10, int(size_mb * 1e6 / frame_bytes))
    try:
        t = time.perf_counter()
        write_synthetic_cp2k_run(tmp / "run", n_molecules=n_molecules, n_frames=n_frames)
        gen_s = time.perf_counter() - t
        total = sum(p.stat().st_size for p in (tmp / "run").glob("*.xyz"))
        pos = tmp / "run" / "synthetic-pos-1.xyz"
        # warm the numba kernels and the page cache outside the timed region
        write_synthetic_cp2k_run(tmp / "warm", n_molecules=2, n_frames=3)
        ingest_cp2k(tmp / "warm", tmp / "warm.zarr", overwrite=True)
        index_xyz(pos)
        t = time.perf_counter()
        ix = index_xyz(pos)
        scan_s = time.perf_counter() - t
        t = time.perf_counter()
        for a in range(0, ix.n_frames, 512):
            read_frames(ix, np.arange(a, min(a + 512, ix.n_frames)))
        parse_s = time.perf_counter() - t
        t = time.perf_counter()
        report = ingest_cp2k(tmp / "run", tmp / "out.zarr", overwrite=True)
        ingest_s = time.perf_counter() - t
        res = {"pos_file_MB": pos.stat().st_size / 1e6, "xyz_total_MB": total / 1e6, "frames": n_frames,
               "atoms": natoms, "scan_MB_s": pos.stat().st_size / 1e6 / scan_s,
               "parse_MB_s": pos.stat().st_size / 1e6 / parse_s, "ingest_MB_s": total / 1e6 / ingest_s,
               "ingest_s": ingest_s, "peak_rss_MB": _peak_rss_mb(), "generate_s": gen_s,
               "frames_checked": report.frames}
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"ensemble bench ingest: synthetic CP2K run, {natoms} atoms x {n_frames} frames, "
          f"{res['xyz_total_MB']:.0f} MB of xyz (pos {res['pos_file_MB']:.0f} MB)")
    print(f"  frame scan (index, sha256)   {res['scan_MB_s']:8.0f} MB/s")
    print(f"  float parse (numba)          {res['parse_MB_s']:8.0f} MB/s")
    print(f"  full ingest -> zarr          {res['ingest_MB_s']:8.0f} MB/s   "
          f"({res['ingest_s']:.1f} s; target >= 50 MB/s on one core)")
    print(f"  peak RSS                     {res['peak_rss_MB']:8.0f} MB")
    return res
