"""Benchmarks that print figures (``ensemble bench ...``). Speed is measured here, not in tests."""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from .elements import default_mass
from . import thermo
from .units import BOHR_PER_AU_TIME_TO_ANGSTROM_PER_FS, CP2K_HARTREE_TO_EV

__all__ = ["write_synthetic_cp2k_run", "bench_ingest", "bench_action"]


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
            ke_ev = thermo.kinetic_energy(vel * BOHR_PER_AU_TIME_TO_ANGSTROM_PER_FS, masses)
            head = f"{natoms:8d}\n i = {f:8d}, time = {t:12.3f}, E = {epot:20.10f}\n"
            for key, arr in (("pos", pos), ("vel", vel), ("frc", frc)):
                files[key].write(head + line % tuple(arr.ravel()))
            ke = ke_ev / CP2K_HARTREE_TO_EV
            temp = thermo.temperature(ke_ev, thermo.degrees_of_freedom(natoms))
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


def _worker_peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _blas_syrk_gflops(rows: int, cols: int, repeat: int = 5) -> float:
    """GFLOP/s of this machine's BLAS forming Z^T Z (numpy dispatches it to syrk) on one thread."""
    z = np.random.default_rng(0).normal(size=(rows, cols))
    z.T @ z
    dt = np.inf
    for _ in range(repeat):                       # the fastest, as the phases it is compared with
        t = time.perf_counter()
        z.T @ z
        dt = min(dt, time.perf_counter() - t)
    return rows * cols * cols / dt / 1e9          # syrk: rows * cols * (cols + 1) / 2 multiply-adds


def _phase_breakdown(n_frames: int = 16) -> dict:
    """ms per frame of invariants, design rows and Z^T Z (agent, paper mode, 18 weights), and this
    process's BLAS syrk rate on the same shapes. Runs inside a (single-threaded) worker."""
    from .data import load_default
    from .fit.gram import agent_rows, n_columns
    from .invariants import invariants_frames, paper_weights, species_index

    ds = load_default().isel(frame=slice(0, n_frames))
    k, p = paper_weights().arrays()
    codes, _ = species_index(ds["species"].values)
    pos = np.ascontiguousarray(ds["positions"].values)
    acc = ds["accelerations"].values
    box = np.tile(np.diag(ds["cell"].values), (n_frames, 1))
    invariants_frames(pos[:1], box[:1], codes, 2, k, p, -1.0, 1.0)
    t = time.perf_counter()
    phi, grad = invariants_frames(pos, box, codes, 2, k, p, -1.0, 1.0)
    t_inv = time.perf_counter() - t
    phi = phi.reshape(n_frames, len(codes), -1)
    grad = grad.reshape(n_frames, len(codes), phi.shape[2], 3)
    c = n_columns(phi.shape[2]) + 1
    zs = [np.empty((3 * int(np.sum(codes == s)) * n_frames, c)) for s in range(2)]
    t_rows = t_zz = np.inf
    for rep in range(4):                     # the first pass compiles / loads the kernel; then the fastest
        t = time.perf_counter()
        for s in range(2):
            at = np.flatnonzero(codes == s)
            nr = 3 * at.size
            for f in range(n_frames):
                agent_rows(np.ascontiguousarray(phi[f][at]), np.ascontiguousarray(grad[f][at]),
                           np.ascontiguousarray(acc[f][at]), 0.01, True, zs[s][f * nr:(f + 1) * nr])
        if rep:
            t_rows = min(t_rows, time.perf_counter() - t)
    for _ in range(3):
        t = time.perf_counter()
        for z in zs:
            z.T @ z
        t_zz = min(t_zz, time.perf_counter() - t)
    flop = sum(z.shape[0] for z in zs) * c * c
    return {"invariants_ms": 1e3 * t_inv / n_frames, "rows_ms": 1e3 * t_rows / n_frames,
            "ztz_ms": 1e3 * t_zz / n_frames, "flop_per_frame": flop / n_frames,
            "syrk_gflops": _blas_syrk_gflops(zs[0].shape[0], c)}


def _bench_spec(n_species: int, angular: bool, paper_mode: bool = True):
    """The feature layouts the Gram benchmarks time: the many-body default (7 weight functions,
    cutoff 4.9 Å, default angular basis), or the paper's 18 weight functions (paper mode, or cutoff
    4.9 Å)."""
    from .angular import default_angular_basis
    from .features import FeatureSpec
    from .fit.pipeline import MANYBODY_CUTOFF_ANGSTROM, manybody_weights
    from .invariants import paper_weights

    if angular:
        return FeatureSpec(n_species, manybody_weights(), default_angular_basis(), "pair", MANYBODY_CUTOFF_ANGSTROM,
                           1.0)
    return FeatureSpec(n_species, paper_weights(), None, "pair", None if paper_mode else MANYBODY_CUTOFF_ANGSTROM, 1.0)


def _kind_phases(kind: str, angular: bool, n_frames: int = 8, paper_mode: bool = True, repeats: int = 3) -> dict:
    """ms per frame of features, design rows and Z^T Z for one model kind on the embedded data, in
    this process (one thread), and this process's BLAS syrk rate on the same shapes (each phase the
    fastest of ``repeats`` timings).

    ``angular``: the many-body default (7 weight functions, cutoff 4.9 Å, default angular basis);
    otherwise the paper's 18 weight functions (paper mode, or cutoff 4.9 Å)."""
    from .data import load_default
    from .features import frame_terms
    from .fit.design import agent_feature_rows, conservative_rows_blas, degree_rows
    from .fit.gram import _row_layout
    from .invariants import species_index

    ds = load_default().isel(frame=slice(0, n_frames))
    codes, _ = species_index(ds["species"].values)
    order = np.argsort(codes, kind="stable")          # species-contiguous rows, as the Gram reduction does
    codes = np.ascontiguousarray(codes[order])
    pos = np.ascontiguousarray(ds["positions"].values[:, order])
    target = (ds["forces"].values if kind == "conservative" else ds["accelerations"].values)[:, order]
    box = np.diag(ds["cell"].values)
    spec = _bench_spec(2, angular, paper_mode)
    n = len(codes)
    s_n = 2
    c = spec.block * (s_n if kind == "conservative" else 1)
    qj, ql = spec.quadratic_pairs()
    atoms = [np.flatnonzero(codes == s) for s in range(s_n)]
    # the reduction's layout (_gram_chunk_features): one buffer, species by species, touched once (as
    # the reused buffer is); conservative rows hold the target, then only the species' support
    colmap, keep, _, _ = _row_layout(spec, kind)
    zall = np.zeros((n_frames * 3 * n, max(k.size for k in keep)))
    zall.fill(0.0)
    off = np.concatenate([[0], np.cumsum([n_frames * 3 * a.size for a in atoms])])
    zs = [zall[off[s]:off[s + 1], :keep[s].size] for s in range(s_n)]
    within = np.arange(n) - np.concatenate([[0], np.cumsum([a.size for a in atoms])])[codes]

    def features(t):
        terms = frame_terms(pos[t], box, codes, spec, angular_values=not (kind == "conservative" and degree_rows(spec)))
        return terms, (terms.self_gradient(codes, s_n) if kind == "agent" else None)

    def rows(t, terms, grad):
        if kind == "conservative":
            rows = off[codes] + t * 3 * np.array([a.size for a in atoms])[codes] + 3 * within
            conservative_rows_blas(terms, codes, spec, zall, rows, legendre=not degree_rows(spec), colmap=colmap)
            zall[(rows[:, None] + np.arange(3)).ravel(), 0] = target[t].ravel()
        else:
            for s in range(s_n):
                nr = 3 * atoms[s].size
                at = atoms[s]
                agent_feature_rows(np.ascontiguousarray(terms.x[at]), np.ascontiguousarray(grad[at]), qj, ql,
                                   np.ascontiguousarray(target[t][at]), 0.01, zs[s][t * nr:(t + 1) * nr])

    rows(0, *features(0))                      # compile / load the kernels
    # every phase timed `repeats` times, the fastest kept: the machine's other load only adds time
    t_feat = t_rows = t_zz = np.inf
    for _ in range(repeats):
        f_sum = r_sum = 0.0
        for t in range(n_frames):
            a = time.perf_counter()
            terms, grad = features(t)
            b = time.perf_counter()
            rows(t, terms, grad)
            f_sum += b - a
            r_sum += time.perf_counter() - b
        t_feat = min(t_feat, f_sum)
        t_rows = min(t_rows, r_sum)
    prods = [np.zeros((k.size, k.size)) for k in keep]
    for pr in prods:
        pr.fill(0.0)                           # touched, as the reduction's reused products are
    for _ in range(repeats):
        a = time.perf_counter()
        for z, pr in zip(zs, prods):
            np.matmul(z.T, z, out=pr)
        t_zz = min(t_zz, time.perf_counter() - a)
    flop = sum(z.shape[0] for z in zs) * (c + 1) ** 2          # the full Gram's, whatever is skipped
    flop_done = sum(z.shape[0] * k.size ** 2 for z, k in zip(zs, keep))
    # end to end: the reduction's own chunk function (features, rows, Z^T Z) on a chunk of 4 x these
    # frames in batches of 8 (stores hold hundreds of frames per chunk: its buffers are allocated once
    # per chunk, so a one-batch chunk would time the allocation)
    from .fit.gram import _gram_chunk_features

    scales = np.full(s_n, 0.01)
    reps = 4
    args = (np.concatenate([pos] * reps), np.concatenate([target] * reps), np.tile(box, (reps * n_frames, 1)),
            np.zeros(reps * n_frames, np.int64))
    kw = dict(codes=codes, spec=spec, scales=scales, kind=kind, batch=8, prior=None)
    _gram_chunk_features(*[a[:1] for a in args], **kw)
    t_chunk = np.inf
    for _ in range(repeats):
        a = time.perf_counter()
        _gram_chunk_features(*args, **kw)
        t_chunk = min(t_chunk, (time.perf_counter() - a) / reps)
    return {"kind": kind, "features": ("pair + angular" if angular else
                                       f"pair ({len(spec.weights)}, {'paper mode' if paper_mode else 'cutoff'})"),
            "columns": c, "features_ms": 1e3 * t_feat / n_frames, "rows_ms": 1e3 * t_rows / n_frames,
            "ztz_ms": 1e3 * t_zz / n_frames, "chunk_ms": 1e3 * t_chunk / n_frames, "flop_per_frame": flop / n_frames,
            "product_flop_share": flop_done / flop,
            "syrk_gflops": _blas_syrk_gflops(zs[0].shape[0], c + 1)}


def _all_kind_phases(n_frames: int) -> list[dict]:
    return [_kind_phases(kind, angular, n_frames, paper)
            for angular, paper in ((False, True), (True, False)) for kind in ("agent", "conservative")]


def bench_gram_kinds(n_frames: int = 8) -> list[dict]:
    """Per-frame cost of the Gram reduction for both kinds, pair-only and many-body, beside this
    machine's syrk rate (the rate the Z^T Z accumulation could reach), all measured inside one
    single-threaded dask worker: the fit's own setting (BLAS, numba and OpenMP on one thread each).
    Measured in this process instead, BLAS would use every core for Z^T Z and syrk while the numba
    phases use one, and the fractions would compare one core with all of them."""
    from .cluster import open_client

    with open_client(n_workers=1, report=lambda m: None) as client:
        out = next(iter(client.run(_all_kind_phases, n_frames).values()))
    print(f"  per frame, one single-threaded worker (128 H2O; {n_frames} frames; rate as a fraction of syrk on the same shapes: "
          "of rows + Z^T Z, and end to end = the reduction's chunk function, features included):")
    print(f"  {'kind':>12} {'features':>24} {'columns':>8} {'features':>9} {'rows':>8} {'Z^T Z':>8} {'frames/s':>9} "
          f"{'rows+ZtZ/syrk':>14} {'end-to-end/syrk':>16}")
    for r in out:
        acc = r["flop_per_frame"] / ((r["rows_ms"] + r["ztz_ms"]) * 1e-3) / 1e9
        whole = r["flop_per_frame"] / (r["chunk_ms"] * 1e-3) / 1e9
        r.update(frames_per_s=1e3 / r["chunk_ms"], syrk_fraction_accumulation=acc / r["syrk_gflops"],
                 syrk_fraction_total=whole / r["syrk_gflops"])
        print(f"  {r['kind']:>12} {r['features']:>24} {r['columns']:8d} {r['features_ms']:7.1f}ms {r['rows_ms']:6.1f}ms "
              f"{r['ztz_ms']:6.1f}ms {r['frames_per_s']:9.2f} {r['syrk_fraction_accumulation']:13.0%} "
              f"{r['syrk_fraction_total']:15.0%}")
    print(f"  (syrk {out[-1]['syrk_gflops']:.1f} GFLOP/s single thread; the agent rows above are the generic kernel's, "
          "the paper-mode agent fit itself uses the tuned path measured first)")
    share = ", ".join(f"{r['features']} {r['product_flop_share']:.0%}" for r in out if r["kind"] == "conservative")
    print(f"  (rates count the full Gram's flops; the conservative products skip the columns zero by construction "
          f"in each species' rows and the twins of other columns, and do {share} of them)")
    return out


def _conservative_whole(client, ds, splits) -> list[dict]:
    """The conservative kind's whole Gram reduction (dask, features, rows, Z^T Z, the sum over
    chunks) on the client's single worker, pair-only (paper mode) and many-body, against that
    worker's syrk rate on the same columns."""
    from .fit.gram import accumulate_gram

    n_species = len(np.unique(ds["species"].values))
    n_rows = 3 * ds.sizes["atom"]
    out = []
    for label, spec in (("pair (18, paper mode)", _bench_spec(n_species, False)),
                        ("pair + angular", _bench_spec(n_species, True))):
        accumulate_gram(ds.isel(frame=slice(0, 50)), kind="conservative", features=spec, splits=splits)   # warm-up
        t = time.perf_counter()
        accumulate_gram(ds, kind="conservative", features=spec, splits=splits)
        dt = time.perf_counter() - t
        c = spec.block * n_species + 1
        syrk = next(iter(client.run(_blas_syrk_gflops, 8 * n_rows, c).values()))
        gflops = ds.sizes["frame"] * n_rows * c * c / dt / 1e9
        out.append({"features": label, "columns": c - 1, "frames_per_s": ds.sizes["frame"] / dt, "gflops": gflops,
                    "syrk_gflops": syrk, "syrk_fraction": gflops / syrk})
    return out


def bench_gram(frames: int | None = None, long_factor: int = 10, workdir: str | Path | None = None) -> dict:
    """Gram reduction of the agent model (paper mode, the paper's 18 weights) on the embedded data.

    Prints frames/s with 1 and 2 workers, peak resident memory per worker for the default
    store and for a store ``long_factor`` times longer (frames repeated), and the effective
    rate of the Z^T Z accumulation against the machine's single-thread BLAS syrk rate.
    """
    from .cluster import open_client
    from .data import load_default
    from .fit.gram import Splits, accumulate_gram, n_columns
    from .invariants import paper_weights
    from .io.store import create_store, open_trajectory, write_frames

    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="ensemble-bench-"))
    ws = paper_weights()
    splits = Splits(0.0, 0.8, 0.1, 0.1)
    try:
        base = load_default()
        if frames:
            base = base.isel(frame=slice(0, frames))
        n = base.sizes["frame"]
        stores = {}
        for factor in (1, long_factor):
            path = tmp / f"x{factor}.zarr"
            create_store(path, base.isel(frame=slice(0, 1)), n * factor, 50)
            for r in range(factor):
                for a in range(0, n, 50):
                    blk = base.isel(frame=slice(a, a + 50))
                    blk = blk.assign_coords(step=blk["step"] + r * n, time=blk["time"] + r * n * 0.5)
                    write_frames(path, blk, r * n + a)
            stores[factor] = path
        res = {"frames": n, "atoms": int(base.sizes["atom"]), "weights": len(ws)}
        p = 2 * len(ws)
        c = n_columns(p) + 1
        rows_per_frame = 3 * base.sizes["atom"]
        flop_per_frame = rows_per_frame * c * c       # Z^T Z multiply-adds x 2 / 2 (symmetric)
        for workers in (1, 2):
            with open_client(n_workers=workers, report=lambda m: None) as client:
                ds = open_trajectory(stores[1]).chunk({"frame": 50})
                accumulate_gram(ds.isel(frame=slice(0, 100)), ws, splits=splits)       # warm-up
                t = time.perf_counter()
                accumulate_gram(ds, ws, splits=splits)
                dt = time.perf_counter() - t
                res[f"frames_per_s_{workers}w"] = n / dt
                res[f"gflops_per_worker_{workers}w"] = n * flop_per_frame / dt / 1e9 / workers
                res[f"peak_rss_mb_{workers}w"] = max(client.run(_worker_peak_rss_mb).values())
                if workers == 1:
                    res["phases"] = next(iter(client.run(_phase_breakdown).values()))
                    res["conservative_whole"] = _conservative_whole(client, ds, splits)
        with open_client(n_workers=2, report=lambda m: None) as client:
            ds = open_trajectory(stores[long_factor]).chunk({"frame": 50})
            t = time.perf_counter()
            accumulate_gram(ds, ws, splits=splits)
            res["long_frames"] = n * long_factor
            res["long_frames_per_s_2w"] = n * long_factor / (time.perf_counter() - t)
            res["long_peak_rss_mb_2w"] = max(client.run(_worker_peak_rss_mb).values())
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    ph = res["phases"]
    res["blas_syrk_gflops"] = ph["syrk_gflops"]
    eff = res["gflops_per_worker_1w"] / res["blas_syrk_gflops"]
    acc_rate = ph["flop_per_frame"] / ((ph["rows_ms"] + ph["ztz_ms"]) * 1e-3) / 1e9
    print(f"ensemble bench gram: agent model, paper mode, {res['weights']} weights ({c - 1} columns per species), "
          f"{res['atoms']} atoms")
    print(f"  1 worker    {res['frames_per_s_1w']:7.1f} frames/s   peak RSS/worker {res['peak_rss_mb_1w']:6.0f} MB")
    print(f"  2 workers   {res['frames_per_s_2w']:7.1f} frames/s   peak RSS/worker {res['peak_rss_mb_2w']:6.0f} MB   "
          f"(scaling efficiency {res['frames_per_s_2w'] / res['frames_per_s_1w'] / 2:.0%})")
    print(f"  {long_factor}x longer store ({res['long_frames']} frames), 2 workers: {res['long_frames_per_s_2w']:7.1f} "
          f"frames/s, peak RSS/worker {res['long_peak_rss_mb_2w']:6.0f} MB")
    print(f"  per frame in one worker: invariants {ph['invariants_ms']:.1f} ms, design rows {ph['rows_ms']:.1f} ms, "
          f"Z^T Z {ph['ztz_ms']:.1f} ms")
    print(f"  Gram accumulation (rows + Z^T Z): {acc_rate:.1f} GFLOP/s = {acc_rate / ph['syrk_gflops']:.0%} of this "
          f"machine's single-thread BLAS syrk ({ph['syrk_gflops']:.1f} GFLOP/s; target >= 50%)")
    print(f"  whole reduction incl. invariants and dask: {res['gflops_per_worker_1w']:.1f} GFLOP/s per worker "
          f"= {eff:.0%} of syrk")
    for w in res["conservative_whole"]:
        print(f"  whole reduction, conservative kind, {w['features']}, 1 worker: {w['frames_per_s']:.1f} frames/s "
              f"= {w['gflops']:.1f} GFLOP/s = {w['syrk_fraction']:.0%} of syrk ({w['syrk_gflops']:.1f} GFLOP/s on "
              f"its {w['columns'] + 1} columns)")
    res["syrk_fraction_accumulation"] = acc_rate / ph["syrk_gflops"]
    res["syrk_fraction_total"] = eff
    res["kinds"] = bench_gram_kinds()
    return res


def bench_md(steps: int = 100, model_path: str | Path | None = None, cutoff_angstrom: float = 5.0,
             cp2k_steps: int = 200, repeats: int = 3) -> dict:
    """Steps/s and atom-steps/s of NVE velocity Verlet with learned forces, 128 and 1024 H2O
    (the embedded box tiled 2x2x2), paper and cutoff mode, both kinds, on one core; and CP2K
    FIST (SPC/Fw) on the same 128-molecule system in the same run, when CP2K is installed.
    Each row is the best of ``repeats`` runs of the same steps from the same state (a shared
    machine's other load only ever slows a run down).

    Without ``model_path`` the models have the paper's 7 weight functions per species and random
    small coefficients (speed does not depend on the values).
    """
    from .data import load_default
    from .invariants import paper_weights
    from .md import initial_state, tile, velocity_verlet
    from .model import Model, load_model

    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    ds = load_default().isel(frame=slice(0, 1))
    tmp = Path(tempfile.mkdtemp(prefix="ensemble-bench-md-"))
    try:
        from .io.store import create_store

        create_store(tmp / "one.zarr", ds, 1, 1)
        from .io.store import write_frames

        write_frames(tmp / "one.zarr", ds, 0)
        base = initial_state(str(tmp / "one.zarr"))
        rng = np.random.default_rng(0)
        ws = paper_weights().subset([1, 3, 9, 11, 13, 16, 17])
        p = 2 * len(ws)

        def model(kind, cutoff):
            if model_path is not None:
                m = load_model(model_path)
                q = len(m.species) * len(m.weights)          # a many-body model's pair block, for these rows
                return Model(kind=kind, species=m.species, masses=m.masses, weights=m.weights,
                             A=tuple(a[:q] for a in m.A), B=tuple(b[:q, :q] for b in m.B),
                             cutoff_angstrom=cutoff, width_angstrom=1.0)
            b = rng.normal(size=(p, p)) * 1e-4
            return Model(kind=kind, species=("H", "O"), masses=(1.00794, 15.9994), weights=ws,
                         A=(rng.normal(size=p) * 1e-3,) * 2, B=(b + b.T,) * 2, cutoff_angstrom=cutoff)

        def manybody(kind):
            """The many-body default (7 weights, cutoff 4.9 Å, default angular basis), small random
            coefficients (a fitted one with --model when it has angular invariants)."""
            from .angular import default_angular_basis
            from .fit.pipeline import MANYBODY_CUTOFF_ANGSTROM, manybody_weights

            if model_path is not None:
                m = load_model(model_path)
                if m.angular is not None:
                    return Model(kind=kind, species=m.species, masses=m.masses, weights=m.weights, A=m.A, B=m.B,
                                 cutoff_angstrom=m.cutoff_angstrom, width_angstrom=m.width_angstrom,
                                 angular=m.angular, prior=m.prior)
            ang = default_angular_basis()
            mw = manybody_weights()
            f = 2 * len(mw) + ang.n_features(2)
            b = np.zeros((f, f))
            # tiny: the atoms move almost freely, so no pair closes in (and blows up) within the run
            q = rng.normal(size=(2 * len(mw), 2 * len(mw))) * 1e-7
            b[:q.shape[0], :q.shape[0]] = q + q.T
            return Model(kind=kind, species=("H", "O"), masses=(1.00794, 15.9994), weights=mw,
                         A=(rng.normal(size=f) * 1e-7,) * 2, B=(b,) * 2, cutoff_angstrom=MANYBODY_CUTOFF_ANGSTROM,
                         angular=ang)

        rows = []
        for n_tile in (1, 2):
            init = tile(base, n_tile)
            for kind in ("agent", "conservative"):
                for mode, cut in (("paper", None), ("cutoff", cutoff_angstrom), ("many-body", None)):
                    m = manybody(kind) if mode == "many-body" else model(kind, cut)
                    init_fn, step_fn = velocity_verlet(m.force_fn(init.box, np.array(init.species)), 0.5, init.masses)
                    s0 = step_fn(init_fn(init.positions, init.velocities))      # compile / warm
                    n = steps if n_tile == 1 or mode != "paper" else max(steps // 10, 3)
                    dt = dc = np.inf
                    for _ in range(repeats):         # the same n steps from the same state; the best run
                        s = s0
                        t = time.perf_counter()
                        c = time.process_time()
                        for _ in range(n):
                            s = step_fn(s)
                        dt = min(dt, time.perf_counter() - t)
                        dc = min(dc, time.process_time() - c)
                    rows.append({"molecules": len(init.species) // 3, "kind": kind, "mode": mode,
                                 "steps_per_s": n / dt, "atom_steps_per_s": n * len(init.species) / dt,
                                 "atom_steps_per_cpu_s": n * len(init.species) / dc})
        fist = _bench_cp2k_fist(tmp, base, cp2k_steps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"ensemble bench md: NVE velocity Verlet, {len(ws) if model_path is None else 'fitted'} weight functions, "
          f"one core (cutoff mode: {cutoff_angstrom} Å, cell lists; many-body: pair cutoff 4.9 Å + angular "
          f"invariants, default basis, cutoff 4.5 Å; target >= 5e4 atom-steps/s); best of {repeats} runs")
    print(f"  {'molecules':>9} {'kind':>13} {'mode':>9} {'steps/s':>9} {'atom-steps/s':>13} {'per CPU s':>10}")
    for r in rows:
        print(f"  {r['molecules']:9d} {r['kind']:>13} {r['mode']:>9} {r['steps_per_s']:9.1f} "
              f"{r['atom_steps_per_s']:13.3g} {r['atom_steps_per_cpu_s']:10.3g}")
    if fist and "skipped" not in fist:
        best = max(r["steps_per_s"] for r in rows if r["molecules"] == 128 and r["mode"] == "cutoff")  # pair only
        print(f"  CP2K FIST (SPC/Fw, SPME) 128 H2O: {fist['s_per_step']:.4f} s/step = {1 / fist['s_per_step']:.1f} "
              f"steps/s; learned cutoff model / FIST = {best * fist['s_per_step']:.1f}x")
        print("  (the paper: 1000 steps of 128 H2O took ~10 h in CP2K DFT and 20 s learning-based on 16 cores)")
    else:
        print(f"  no CP2K FIST comparison: {fist['skipped']}")
    return {"rows": rows, "fist": fist}


def _bench_cp2k_fist(tmp: Path, state, steps: int) -> dict:
    """Time CP2K FIST SPC/Fw NVE on ``state`` (one MPI rank, one thread); ``{"skipped": why}`` when
    it cannot run."""
    import subprocess

    from .io.cp2k_input import read_input, render_input
    from .reference import Cp2kNotFound, find_cp2k

    try:
        cmd = find_cp2k()
    except Cp2kNotFound as exc:
        return {"skipped": f"CP2K not found ({exc})"}
    inp = Path(__file__).resolve().parents[1] / "configs" / "cp2k" / "fist-spcfw-nve.inp"
    if not inp.is_file():
        return {"skipped": f"CP2K is installed ({' '.join(cmd)}), but the FIST input {inp} is not: it ships "
                           "with a source checkout (configs/cp2k), not with an installed package"}
    root = read_input(inp)
    root.ensure("MOTION/MD").set("STEPS", str(steps))
    root.ensure("GLOBAL").set("PROJECT", "bench")
    for name in ("TRAJECTORY", "VELOCITIES", "FORCES", "CELL"):
        root.ensure(f"MOTION/PRINT/{name}/EACH").set("MD", str(steps))
    lines = [str(len(state.species)), "bench"] + [f"{s} {x:.10f} {y:.10f} {z:.10f}"
                                                  for s, (x, y, z) in zip(state.species, state.positions)]
    (tmp / "water.xyz").write_text("\n".join(lines) + "\n")
    (tmp / "bench.inp").write_text(render_input(root))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t = time.perf_counter()
    done = subprocess.run(cmd + ["-i", "bench.inp", "-o", "bench.out"], cwd=tmp, env=env, capture_output=True)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        tail = (tmp / "bench.out").read_text()[-300:] if (tmp / "bench.out").exists() else done.stderr[-300:]
        return {"skipped": f"CP2K failed (exit code {done.returncode}): {tail!r}"}
    return {"steps": steps, "seconds": wall, "s_per_step": wall / steps}


def bench_runner(members: int = 8, steps: int = 1000, model_path: str | Path | None = None,
                 workdir: str | Path | None = None) -> dict:
    """Ensemble throughput: members/s with 1 and 2 LocalCluster workers, the overhead per member
    (wall time x workers - time spent inside the members) relative to a member's own runtime,
    and the scaling efficiency from 1 to 2 workers.

    Members: NVT runs of the embedded 128 H2O (cutoff 5 Å conservative model: ``model_path``,
    or the paper's 7 weight functions with small random coefficients; speed does not depend on
    the values), ``steps`` steps each, analysed in the worker. Cluster start-up and kernel
    warm-up are excluded (done once per cluster); the final aggregation is timed separately.
    """
    from .cluster import open_client
    from .data import write_default_store
    from .invariants import paper_weights
    from .model import Model
    from .report import report_ensemble
    from .runner import load_ensemble, run_ensemble

    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="ensemble-bench-runner-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        ref = tmp / "reference.zarr"
        if not ref.exists():
            write_default_store(ref)
        if model_path is None:
            rng = np.random.default_rng(0)
            ws = paper_weights().subset([1, 3, 9, 11, 13, 16, 17])
            p = 2 * len(ws)
            b = rng.normal(size=(p, p)) * 1e-4
            model_path = tmp / "model.json"
            Model(kind="conservative", species=("H", "O"), masses=(1.00794, 15.9994), weights=ws,
                  A=(rng.normal(size=p) * 1e-3,) * 2, B=(b + b.T,) * 2, cutoff_angstrom=5.0).save(model_path)
        rows = []
        for n_workers in (1, 2):
            cfg = tmp / f"bench-{n_workers}.toml"
            cfg.write_text(f'[ensemble]\nname = "bench"\nreference = "{ref}"\n[models]\nm = "{Path(model_path).resolve()}"\n'
                           f'[defaults]\nsteps = {steps}\nstride = 4\n[grid]\nseed = {list(range(1, members + 1))}\n')
            ens = load_ensemble(cfg)
            out = tmp / f"out-{n_workers}"
            shutil.rmtree(out, ignore_errors=True)
            with open_client(None, n_workers, report=lambda m: None) as client:
                t0 = time.perf_counter()
                summaries = run_ensemble(ens, out, client, report=lambda m: None)
                wall = time.perf_counter() - t0
            t1 = time.perf_counter()
            report_ensemble(ens, out, summaries)
            agg_s = time.perf_counter() - t1
            inside = [s["seconds"] for s in summaries]
            bad = [s for s in summaries if s["status"] != "complete"]
            if bad:
                raise RuntimeError(f"bench member {bad[0]['id']} did not complete: {bad[0].get('error')}")
            overhead = (wall * n_workers - sum(inside)) / members
            rows.append({"workers": n_workers, "members": members, "wall_s": wall, "members_per_s": members / wall,
                         "member_s": float(np.mean(inside)), "simulate_s": float(np.mean([s["simulate_s"] for s in summaries])),
                         "analyze_s": float(np.mean([s["analyze_s"] for s in summaries])),
                         "overhead_per_member_s": overhead, "overhead_fraction": overhead / float(np.mean(inside)),
                         "aggregate_s": agg_s})
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    eff = rows[1]["members_per_s"] / (2 * rows[0]["members_per_s"])
    print(f"ensemble bench runner: {members} members x {steps} steps of 128 H2O (NVT, cutoff 5 Å, analysed in "
          "the worker), LocalCluster")
    print(f"  {'workers':>7} {'wall s':>7} {'members/s':>10} {'member s':>9} {'(sim + analyze)':>16} "
          f"{'overhead/member':>16} {'aggregate s':>12}")
    for r in rows:
        print(f"  {r['workers']:7d} {r['wall_s']:7.1f} {r['members_per_s']:10.3f} {r['member_s']:9.2f} "
              f"{r['simulate_s']:7.2f} + {r['analyze_s']:5.2f}  {r['overhead_per_member_s']:7.3f} s "
              f"({100 * r['overhead_fraction']:4.1f} %) {r['aggregate_s']:12.1f}")
    print(f"  scaling efficiency 1 -> 2 workers: {100 * eff:.1f} % (members/s with 2 workers / twice that with 1)")
    return {"rows": rows, "scaling_efficiency": eff}


def bench_action(model_path: str | Path, action_paths, *, ps: float = 1.0, init: str | None = None) -> dict:
    """Simulated ps per second of velocity Verlet at 0.5 fs against the long-step action map at
    the steps of the given action models (e.g. 2, 4 and 8 fs): the same conservative model, the
    same box (the embedded 128 H2O, or ``init``), the same initial state, NVE, ``ps`` simulated
    picoseconds each, no output; and the fixed-point iterations (force evaluations) per step.

    Wall-clock and process CPU time are both reported: on a shared machine the CPU time is the
    fairer measure of the work. An entry ``midpoint:H`` times the map with the learned terms off
    (the implicit midpoint rule) at step H fs; ``respa:H`` (or ``respa:H:N``) multiple time stepping
    at a long step of H fs with N inner steps of the short-range part (default: inner steps of
    0.5 fs), one full force evaluation per long step; ``respa-molecules:H[:N]`` the same with the
    intramolecular split.
    """
    from .md import initial_state, velocity_verlet
    from .md.action import ActionModel, ModelPotential, action_integrator, direct_integrator, load_action
    from .model import load_model

    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    model = load_model(model_path)
    tmp = None
    if init is None:
        from .data import write_default_store

        tmp = Path(tempfile.mkdtemp(prefix="ensemble-bench-action-"))
        write_default_store(tmp / "ref.zarr")
        init = f"{tmp / 'ref.zarr'}:200"
    try:
        state = initial_state(init)
        v0 = state.velocities - (state.masses @ state.velocities) / state.masses.sum()

        def timed(init_fn, step_fn, dt_fs, potential=None):
            s = init_fn(state.positions, v0)
            for _ in range(3):                              # compile / warm
                s = step_fn(s)
            s = init_fn(state.positions, v0)
            n = max(int(round(ps * 1000.0 / dt_fs)), 1)
            its = []
            evals0 = potential.evaluations if potential is not None else 0
            w, c = time.perf_counter(), time.process_time()
            for k in range(n):
                try:
                    s = step_fn(s)
                except ArithmeticError as exc:          # a run that blows up fails inside a kernel
                    raise RuntimeError(f"blew up in step {k + 1} ({type(exc).__name__}: {exc})") from None
                if not np.isfinite(s.velocities).all():
                    raise RuntimeError(f"blew up in step {k + 1} (non-finite velocities)")
                if s.aux is not None and "iterations" in s.aux:
                    its.append(s.aux["iterations"])
            w, c = time.perf_counter() - w, time.process_time() - c
            simulated = n * dt_fs * 1e-3
            row = {"dt_fs": dt_fs, "steps": n, "wall_s": w, "cpu_s": c, "ps_per_wall_s": simulated / w,
                   "ps_per_cpu_s": simulated / c}
            if its:
                row.update(iterations_mean=float(np.mean(its)), iterations_max=int(np.max(its)),
                           force_evaluations_per_step=(potential.evaluations - evals0) / n)
            return row

        rows = [dict(timed(*velocity_verlet(model.force_fn(state.box, np.array(state.species)), 0.5, state.masses),
                           0.5), integrator="verlet")]
        for path in action_paths:
            if str(path).startswith(("respa:", "respa-molecules:")):   # multiple time stepping
                from .md.respa import default_inner_steps, fast_force_fn, respa

                kind, _, rest = str(path).partition(":")
                split = "molecules" if kind == "respa-molecules" else "distance"
                h, _, n_in = rest.partition(":")
                h = float(h)
                n_in = int(n_in) if n_in else default_inner_steps(h, split)
                sp = np.array(state.species)
                fast, _ = fast_force_fn(model, state.positions, state.box, sp, split)
                fns = respa(model.force_fn(state.box, sp), fast, h, n_in, state.masses)
                name = "respa" if split == "distance" else "respa-mol"
                try:
                    rows.append(dict(timed(*fns, h), integrator=name, source=str(path), inner_steps=n_in))
                except Exception as exc:
                    rows.append({"dt_fs": h, "integrator": name, "source": str(path), "error": str(exc)})
                continue
            if str(path).startswith("midpoint:"):               # the map with the learned terms off
                from .md.action import default_features

                feats = default_features(model.species)
                am = ActionModel("action", float(str(path).split(":", 1)[1]), feats, np.zeros(feats.n_features))
            else:
                am = load_action(path)
                am.check_potential(model_path)
            pot = ModelPotential(model, state.box, state.species)
            if am.kind == "action":
                fns = action_integrator(pot, am, state.masses, state.species, state.box, energy_every=10 ** 9)
            else:
                fns = direct_integrator(pot, am, state.masses, state.species, state.box)
            name = "midpoint" if str(path).startswith("midpoint:") else am.kind
            try:
                rows.append(dict(timed(*fns, am.dt_fs, pot), integrator=name, source=str(path)))
            except Exception as exc:            # a map that fails is a result too
                rows.append({"dt_fs": am.dt_fs, "integrator": name, "source": str(path), "error": str(exc)})
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    base = rows[0]
    print(f"ensemble bench md --action: {len(state.species)} atoms, NVE from {init}, {ps:g} ps each, one core")
    print(f"  {'integrator':>10} {'dt fs':>6} {'ps/wall-s':>10} {'ps/CPU-s':>9} {'speed-up':>9} {'iterations/step':>16}")
    for r in rows:
        if "error" in r:
            print(f"  {r['integrator']:>10} {r['dt_fs']:6.2f}  failed: {r['error']}")
            continue
        r["speedup_cpu"] = r["ps_per_cpu_s"] / base["ps_per_cpu_s"]
        it = (f"{r['iterations_mean']:.2f} (max {r['iterations_max']})" if "iterations_mean" in r else
              f"1 + {r['inner_steps']} fast" if "inner_steps" in r else "1 (explicit)")
        print(f"  {r['integrator']:>10} {r['dt_fs']:6.2f} {r['ps_per_wall_s']:10.3f} {r['ps_per_cpu_s']:9.3f} "
              f"{r['speedup_cpu']:8.2f}x {it:>16}")
    return {"rows": rows}


# --------------------------------------------------------------------------- out-of-core at scale

#: a segment of the scaled store: 20 000 NVT steps (10 ps at 0.5 fs), a frame every 2 steps (1 fs)
SCALE_SEGMENT_STEPS, SCALE_STRIDE = 20_000, 2


def _scale_segment(model_path: str, ref: str, k: int, steps: int, out: str) -> dict:
    """One independent NVT segment of learned MD (a dask task): from frame ``(47 k) mod n`` of the
    embedded data with Maxwell-Boltzmann velocities at 300 K (seed k), forces written."""
    import dask

    from .io.store import open_trajectory
    from .md import initial_state, simulate
    from .md.simulate import SimulationError
    from .model import load_model

    model = load_model(model_path)
    n = open_trajectory(ref).sizes["frame"]
    with dask.config.set(scheduler="synchronous"):
        for attempt in range(3):      # a segment the model blows up in is redrawn with another seed
            seed = k + 1000 * attempt
            init = initial_state(ref, frame=(47 * k) % n, temperature_K=300.0, seed=seed)
            try:
                s = simulate(model, init, steps=steps, dt_fs=0.5, temperature_K=300.0, stride=SCALE_STRIDE,
                             tau_fs=100.0, out=out, overwrite=True, write_forces=True, checkpoint_every=steps,
                             block_frames=500)
                return {"segment": k, "seed": seed, "init_frame": (47 * k) % n, "frames": s.frames,
                        "mean_temperature_K": s.mean_temperature_K, "seconds": s.seconds}
            except SimulationError as exc:
                last = exc
    raise RuntimeError(f"segment {k}: the model blew up with three seeds ({last})")


def build_scaled_store(scale: int, cache: str | Path, *, model_path: str | Path | None = None, workers: int = 2,
                       report=None) -> Path:
    """A trajectory store ``scale`` times the embedded one (``scale`` x 1001 frames of 384 atoms),
    made by learned MD from the embedded data, built once in ``cache`` and reused.

    The frames are independent 10 ps NVT segments at 300 K (0.5 fs steps, a frame every 2
    steps, forces written) of a conservative cutoff model (5 Å; ``model_path``, or one fitted
    here on the embedded data and kept in ``cache``), each started from another frame of the
    embedded data with its own Maxwell-Boltzmann velocities, run in parallel on a LocalCluster
    and written in order into one store (chunked along frames as ``ensemble ingest`` does).
    An interrupted build continues with the segments not yet written.
    """
    import json

    import dask
    from distributed import as_completed

    from .cluster import ClusterSpec, open_client
    from .data import load_default, write_default_store
    from .io.store import atomic_write_text

    report = report or (lambda msg: print(msg, flush=True))
    cache = Path(cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    n_ref = load_default().sizes["frame"]
    n_frames = scale * n_ref
    final = cache / f"learned-md-x{scale}.zarr"
    if final.exists():
        return final
    ref = cache / "embedded.zarr"
    if not ref.exists():
        write_default_store(ref)
    if model_path is None:
        model_path = cache / "conservative-c5.json"
        if not model_path.exists():
            from .fit.pipeline import fit_store, load_fit_config

            report(f"fitting a conservative cutoff model (5 Å) on the embedded data -> {model_path}")
            with open_client(spec=ClusterSpec(workers=workers), report=lambda m: None):
                cfg = load_fit_config(None, kind="conservative", neighbour_mode="cutoff", cutoff_angstrom=5.0,
                                      frame_stride=4, chunk_frames=10)
                fit_store(ref, cfg, progress=lambda m: None).model.save(model_path)
    per = SCALE_SEGMENT_STEPS // SCALE_STRIDE + 1
    n_seg = -(-n_frames // per)
    building = cache / f".learned-md-x{scale}.zarr.building"
    done_file = cache / f".learned-md-x{scale}.segments.json"
    done = json.loads(done_file.read_text()) if building.exists() and done_file.exists() else {}
    segdir = cache / "segments"
    segdir.mkdir(exist_ok=True)
    todo = [k for k in range(n_seg) if str(k) not in done]
    report(f"building {final}: {n_frames} frames = {n_seg} segments of {SCALE_SEGMENT_STEPS} NVT steps "
           f"(stride {SCALE_STRIDE}), {len(todo)} to run on {workers} workers")
    t0 = time.perf_counter()
    with open_client(spec=ClusterSpec(workers=workers), report=lambda m: None) as client:
        futs = []
        for k in todo:
            frames_k = min(per, n_frames - k * per)
            steps_k = (frames_k - 1) * SCALE_STRIDE
            futs.append(client.submit(_scale_segment, str(model_path), str(ref), k, steps_k,
                                      str(segdir / f"seg-{k}.zarr"), key=f"scale-segment-{k}", pure=False))
        for fut in as_completed(futs):
            info = fut.result()
            with dask.config.set(scheduler="synchronous"):    # here, not behind the segments on the workers
                _append_segment(segdir / f"seg-{info['segment']}.zarr", building, info["segment"] * per, n_frames,
                                n_seg)
            k = info["segment"]
            done[str(k)] = info
            atomic_write_text(done_file, json.dumps(done, indent=1) + "\n")
            shutil.rmtree(segdir / f"seg-{k}.zarr", ignore_errors=True)
            report(f"  segment {k + 1}/{n_seg}: {info['frames']} frames, mean T {info['mean_temperature_K']:.0f} K, "
                   f"{len(done)}/{n_seg} written, {time.perf_counter() - t0:.0f} s")
    import zarr

    root = zarr.open_group(building, mode="r+")
    root.attrs["segments"] = json.dumps([done[str(k)] for k in range(n_seg)])
    os.replace(building, final)
    done_file.unlink()
    shutil.rmtree(segdir, ignore_errors=True)
    return final


def _append_segment(segment: Path, building: Path, start: int, n_frames: int, n_seg: int) -> None:
    """Write one segment's frames at ``start`` of the scaled store (laid out on the first call)."""
    from .io.store import create_store, default_chunk_frames, open_trajectory, write_frames

    seg = open_trajectory(segment)
    keep = [v for v in ("positions", "velocities", "forces", "accelerations", "kinetic_energy", "temperature",
                        "potential_energy", "conserved_energy") if v in seg]
    seg = seg[keep + ["masses", "cell"]]
    if not building.exists():
        tmpl = seg.isel(frame=slice(0, 1)).load()
        tmpl.attrs = {**{a: seg.attrs[a] for a in ("schema", "timestep_fs", "model_provenance") if a in seg.attrs},
                      "title": f"learned MD (conservative, cutoff 5 Å), {n_seg} independent NVT segments "
                               f"of 10 ps at 300 K, concatenated",
                      "source_format": "ensemble bench gram --scale", "frame_interval_fs": 0.5 * SCALE_STRIDE,
                      "acceleration_source": "model forces / masses", "created_by": "ensemble bench gram"}
        create_store(building, tmpl, n_frames, default_chunk_frames(seg.sizes["atom"]))
    blk = seg.load()
    steps = np.arange(start, start + blk.sizes["frame"]) * SCALE_STRIDE
    write_frames(building, blk.assign_coords(step=("frame", steps), time=("frame", 0.5 * steps)), start)


def _worker_spilled_bytes(dask_worker) -> int:
    total = getattr(dask_worker.data, "spilled_total", None)
    return int(getattr(total, "disk", 0) or 0) if total is not None else 0


def bench_gram_scale(scale: int = 100, workdir: str | Path | None = None, *, model_path: str | Path | None = None,
                     workers: int = 2, memory_limit: str = "1GB", chunk_frames: int = 50,
                     cutoff_angstrom: float | None = 5.0, n_weights: int = 18) -> dict:
    """Out-of-core fit at scale: the agent model (cutoff 5 Å, the paper's 18 weights, or
    ``n_weights = 7`` of them) fitted on the first 1x, 10x, ... up to ``scale`` x the embedded
    frames of a learned-MD store
    (:func:`build_scaled_store`, cached in ``workdir``, default ~/.cache/ensemble), each on a
    fresh LocalCluster of ``workers`` workers limited to ``memory_limit`` each.

    Prints, per length: frames, wall time of the Gram pass, frames/s, the peak RSS of every
    worker, bytes spilled to disk, and the validation error of the fit (all weights, quadratic).
    Memory stays flat because only (C + 1)^2 matrices are combined, whatever the length.
    """
    from .cluster import ClusterSpec, open_client, process_peak_rss_mb
    from .fit.gram import Splits, accumulate_gram, fit_species
    from .invariants import paper_weights
    from .io.store import open_trajectory

    cache = Path(workdir).expanduser() if workdir else Path.home() / ".cache" / "ensemble"
    t_build = time.perf_counter()
    store = build_scaled_store(scale, cache, model_path=model_path, workers=workers)
    build_s = time.perf_counter() - t_build
    full = open_trajectory(store)
    n_ref = full.sizes["frame"] // scale
    factors = [f for f in (1, 10, 100, 1000) if f < scale] + [scale]
    # all 18 of the paper's weight functions, or the 7 that `ensemble bench md` uses (703 or 119 columns)
    ws = paper_weights() if n_weights == 18 else paper_weights().subset([1, 3, 9, 11, 13, 16, 17])
    rows = []
    for factor in factors:
        n = n_ref * factor
        spec = ClusterSpec(workers=workers, memory=memory_limit)
        with open_client(spec=spec, report=lambda m: None) as client:
            ds = full.isel(frame=slice(0, n)).chunk({"frame": chunk_frames})
            accumulate_gram(full.isel(frame=slice(0, 2 * chunk_frames)).chunk({"frame": chunk_frames}), ws,
                            splits=Splits(), cutoff_angstrom=cutoff_angstrom)       # warm-up (kernels, imports)
            t = time.perf_counter()
            gram = accumulate_gram(ds, ws, splits=Splits(), cutoff_angstrom=cutoff_angstrom)
            dt = time.perf_counter() - t
            rss = client.run(process_peak_rss_mb)
            spilled = client.run(_worker_spilled_bytes)
        with warnings.catch_warnings():         # all 18 weights: ill-conditioned, ridge-regularised
            warnings.simplefilter("ignore", RuntimeWarning)
            val = {name: fit_species(gram, s).errors["validation"] for s, name in enumerate(gram.species)}
        rows.append({"factor": factor, "frames": n, "seconds": dt, "frames_per_s": n / dt,
                     "peak_rss_mb": sorted(rss.values()), "spilled_bytes": int(sum(spilled.values())),
                     "validation_relative_rmse": val})
        print(f"  {factor:4d}x {n:7d} frames  {dt:8.1f} s  {n / dt:6.1f} frames/s  peak RSS/worker "
              + " ".join(f"{v:5.0f}" for v in sorted(rss.values())) + f" MB  spilled {sum(spilled.values()) / 1e6:.0f} MB"
              + "  validation " + ", ".join(f"{k} {v:.3f}" for k, v in val.items()), flush=True)
    size_gb = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 1e9
    print(f"ensemble bench gram --scale {scale}: {store} ({full.sizes['frame']} frames x {full.sizes['atom']} atoms, "
          f"{size_gb:.2f} GB on disk; built or found in {build_s:.0f} s)")
    mode = f"cutoff {cutoff_angstrom:g} Å" if cutoff_angstrom else "paper mode"
    print(f"  agent model, {mode}, {len(ws)} weights; {workers} workers, memory_limit {memory_limit} each, "
          f"{chunk_frames} frames per task")
    print(f"  {'length':>6} {'frames':>8} {'wall s':>9} {'frames/s':>9} {'peak RSS per worker (MB)':>26} {'spilled':>9}")
    for r in rows:
        print(f"  {r['factor']:5d}x {r['frames']:8d} {r['seconds']:9.1f} {r['frames_per_s']:9.1f} "
              f"{' '.join(f'{v:6.0f}' for v in r['peak_rss_mb']):>26} {r['spilled_bytes'] / 1e6:7.0f} MB")
    growth = max(rows[-1]["peak_rss_mb"]) / max(rows[0]["peak_rss_mb"])
    print(f"  peak RSS per worker at {rows[-1]['factor']}x / at 1x: {growth:.2f}")
    return {"store": str(store), "store_gb": size_gb, "rows": rows, "rss_growth": growth}
