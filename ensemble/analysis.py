"""Analyses of a trajectory store (reference or learned), lazily with dask over frames.

The paper's statistics (Figs. 1, 3-7) and a few more, each a function of a trajectory
Dataset returning xarray objects with ``attrs["units"]``:

- kinetic energy / temperature over time, overall and per species (equipartition);
- molecules (each H to its nearest O under minimum image; ambiguity and proton transfer
  are reported, never silently mixed up), O-H bond lengths, H-O-H angles;
- radial distribution functions per species pair (a numba kernel per frame block);
- vibrational power spectrum of the O-H bond oscillations and its peak per time window;
  the vibrational density of states per species (power spectrum of the velocities, i.e.
  the Fourier transform of the velocity autocorrelation, Wiener-Khinchin);
- stability of a run: time of the first O-H bond beyond 2 Å, or of the first 1 ps window
  whose g(r) departs from a reference by an area above 3 (after Fu et al. 2023).

:func:`analyze` collects them in one statistics Dataset (schema ``ensemble.stats/1``).
Per-frame work is a pure numpy/numba function applied with ``xarray.apply_ufunc(...,
dask="parallelized")``; every variable declares how partial results merge
(``attrs["merge"]``, see :data:`MERGE`): per-frame series concatenate along ``frame``;
spectra are computed in non-overlapping windows of ``window_frames`` frames aligned to
absolute step numbers and concatenate along ``window``. So the same analysis runs on a
whole store, on frame chunks in parallel, or on pieces merged afterwards (:func:`merge`),
and gives the same numbers when pieces are cut at window boundaries.
Derived figures (histograms, mean spectra, peaks of means, time to failure) are computed
from the merged statistics, never merged themselves.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
from numba import njit

from . import __version__
from .invariants import orthorhombic_box, pair_geometry
from .units import AMU_A2_PER_FS2_TO_EV, BOLTZMANN_EV_K
from .errors import UserError

__all__ = ["Molecules", "assign_molecules", "oh_bonds", "hoh_angles", "species_temperature", "MERGE", "merge",
           "AssignmentWarning", "rdf", "species_pairs", "power_spectrum", "spectral_peak", "peak_position", "oh_spectrum", "vdos",
           "analyze", "write_stats", "open_stats", "block_average", "run_scalars", "time_to_failure", "rdf_area", "histogram",
           "SPEED_OF_LIGHT_CM_PER_FS", "STATS_SCHEMA", "AnalysisError"]

#: how each analysis's partial results combine
MERGE = {"oh_bond": "concat(frame)", "hoh_angle": "concat(frame)", "species_temperature": "concat(frame)",
         "oh_bond_mean": "concat(frame)", "oh_bond_std": "concat(frame)", "hoh_angle_mean": "concat(frame)",
         "hoh_angle_std": "concat(frame)", "kinetic_energy": "concat(frame)", "temperature": "concat(frame)",
         "rdf": "concat(frame)", "oh_spectrum": "concat(window)", "oh_spectrum_peak": "concat(window)",
         "vdos": "concat(window)", "oh_bond_hist": "sum", "hoh_angle_hist": "sum"}
BOND_EDGES = np.linspace(0.6, 2.0, 281)      #: Å, 0.005 Å bins for O-H bond-length histograms
ANGLE_EDGES = np.linspace(60.0, 180.0, 241)  #: deg, 0.5 deg bins for H-O-H angle histograms

STATS_SCHEMA = "ensemble.stats/1"
SPEED_OF_LIGHT_CM_PER_FS = 2.99792458e-5   #: c in cm/fs: wavenumber (cm^-1) = frequency (1/fs) / c
#: spectra need frames at least this often: the O-H stretch (~3700 cm^-1) must lie below Nyquist
SPECTRUM_MAX_WAVENUMBER = 5000.0
OH_STRETCH_BAND = (2500.0, 4500.0)         #: cm^-1, where the O-H stretch peak is looked for
STATS_CHUNK_FRAMES = 1024                  #: frames per chunk in a statistics store


class AnalysisError(UserError, ValueError):
    """A store cannot be analysed as asked (too few frames, uneven time axis, ...)."""


class AssignmentWarning(UserWarning):
    """Molecule assignment is ambiguous or changes during the run."""


@dataclass(frozen=True)
class Molecules:
    """Water molecules: ``oxygen[m]`` and ``hydrogens[m] = (h1, h2)`` atom indices."""

    oxygen: np.ndarray
    hydrogens: np.ndarray


def _mic(d: np.ndarray, box: np.ndarray) -> np.ndarray:
    return d - box * np.round(d / box)


def _nearest_o(pos: np.ndarray, box: np.ndarray, o_idx: np.ndarray, h_idx: np.ndarray):
    d = _mic(pos[..., h_idx, None, :] - pos[..., None, o_idx, :], box)
    r = np.sqrt((d * d).sum(-1))                         # (..., H, O)
    order = np.argsort(r, axis=-1)
    return order[..., 0], np.take_along_axis(r, order[..., :2], axis=-1)


def assign_molecules(ds: xr.Dataset, frame: int = 0, ambiguity_ratio: float = 0.8) -> Molecules:
    """Assign each H to its nearest O in ``frame``; every O must get exactly two H.

    Raises ValueError when an O gets other than two H; warns (AssignmentWarning) when an H's
    nearest O is not clearly nearer than the second (distance ratio above ``ambiguity_ratio``).
    """
    species = np.array([str(s) for s in ds["species"].values])
    o_idx, h_idx = np.flatnonzero(species == "O"), np.flatnonzero(species == "H")
    if o_idx.size == 0 or h_idx.size != 2 * o_idx.size:
        raise ValueError(f"water needs 2 H per O; the store has {o_idx.size} O and {h_idx.size} H")
    box = orthorhombic_box(ds["cell"].values if "frame" not in ds["cell"].dims else ds["cell"].values[frame])
    pos = np.asarray(ds["positions"].isel(frame=frame).values)
    nearest, r2 = _nearest_o(pos, box, o_idx, h_idx)
    counts = np.bincount(nearest, minlength=o_idx.size)
    if (counts != 2).any():
        bad = int(np.flatnonzero(counts != 2)[0])
        raise ValueError(f"frame {frame}: O atom {int(o_idx[bad])} has {int(counts[bad])} nearest H (expected 2): "
                         "not intact water molecules")
    ratio = r2[:, 0] / r2[:, 1]
    if (ratio > ambiguity_ratio).any():
        h = int(h_idx[np.argmax(ratio)])
        warnings.warn(f"frame {frame}: H atom {h} is {r2[np.argmax(ratio), 0]:.2f} Å from its O and "
                      f"{r2[np.argmax(ratio), 1]:.2f} Å from the next: ambiguous assignment", AssignmentWarning,
                      stacklevel=2)
    hyd = np.stack([h_idx[nearest == m] for m in range(o_idx.size)])
    return Molecules(oxygen=o_idx, hydrogens=hyd)


def _bonds_kernel(pos, box, o, h):
    """(frame, atom, xyz) -> (frame, bond) O-H distances; bond = 2 m + j for H j of molecule m."""
    d = _mic(pos[:, h, :] - pos[:, o, None, :], box)      # (frame, mol, 2, xyz)
    return np.sqrt((d * d).sum(-1)).reshape(pos.shape[0], -1)


def _angles_kernel(pos, box, o, h):
    d = _mic(pos[:, h, :] - pos[:, o, None, :], box)
    a, b = d[:, :, 0], d[:, :, 1]
    cos = (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def _apply(ds, kernel, mol, out_dim):
    if "frame" in ds["cell"].dims:
        raise ValueError("a cell that changes per frame is not supported by this analysis")
    box = orthorhombic_box(ds["cell"].values)
    return xr.apply_ufunc(kernel, ds["positions"], input_core_dims=[["atom", "xyz"]], output_core_dims=[[out_dim]],
                          kwargs={"box": box, "o": mol.oxygen, "h": mol.hydrogens}, dask="parallelized",
                          output_dtypes=[float],
                          dask_gufunc_kwargs={"output_sizes": {out_dim: mol.hydrogens.size if out_dim == "bond"
                                                               else mol.oxygen.size}})


def oh_bonds(ds: xr.Dataset, molecules: Molecules | None = None, check_every: int = 0) -> xr.DataArray:
    """O-H bond lengths (frame, bond), Å, lazily. Bond 2m + j is H j of molecule m.

    With ``check_every`` > 0 the assignment is re-done on every n-th frame and a change
    (an H now nearer to another O) raises a warning naming the first frame where it happens.
    """
    mol = molecules or assign_molecules(ds)
    out = _apply(ds, _bonds_kernel, mol, "bond")
    if check_every > 0:
        species = np.array([str(s) for s in ds["species"].values])
        o_idx, h_idx = np.flatnonzero(species == "O"), np.flatnonzero(species == "H")
        owner = {int(h): int(o) for o, hs in zip(mol.oxygen, mol.hydrogens) for h in hs}
        box = orthorhombic_box(ds["cell"].values)
        for f in range(0, ds.sizes["frame"], check_every):
            nearest, _ = _nearest_o(np.asarray(ds["positions"].isel(frame=f).values), box, o_idx, h_idx)
            moved = [int(h) for h, n in zip(h_idx, nearest) if owner[int(h)] != int(o_idx[n])]
            if moved:
                warnings.warn(f"frame {f}: H atom {moved[0]} is now nearest to another O than in frame 0 "
                              f"({len(moved)} H changed): proton transfer or a broken bond", AssignmentWarning,
                              stacklevel=2)
                break
    out.attrs = {"units": "angstrom", "long_name": "O-H bond length", "merge": MERGE["oh_bond"]}
    return out.rename("oh_bond")


def hoh_angles(ds: xr.Dataset, molecules: Molecules | None = None) -> xr.DataArray:
    """H-O-H angles (frame, molecule), degrees, lazily."""
    mol = molecules or assign_molecules(ds)
    out = _apply(ds, _angles_kernel, mol, "molecule")
    out.attrs = {"units": "deg", "long_name": "H-O-H angle", "merge": MERGE["hoh_angle"]}
    return out.rename("hoh_angle")


def species_temperature(ds: xr.Dataset) -> xr.DataArray:
    """Kinetic temperature per species (frame, species), K: mean kinetic energy per atom / (3/2 k_B)."""
    ke = 0.5 * AMU_A2_PER_FS2_TO_EV * ds["masses"] * (ds["velocities"] ** 2).sum("xyz")
    labels = xr.DataArray(np.array([str(s) for s in ds["species"].values], dtype=object), dims="atom",
                          name="species")            # in memory: grouping needs known labels
    out = (ke.drop_vars("species", errors="ignore").groupby(labels).mean() / (1.5 * BOLTZMANN_EV_K)).transpose("frame", "species")
    out.attrs = {"units": "K", "long_name": "kinetic temperature per species", "merge": MERGE["species_temperature"]}
    return out.rename("species_temperature")


# --------------------------------------------------------------------------- time axis


def _frame_interval(ds: xr.Dataset) -> tuple[float, int]:
    """(frame interval in fs, step interval) of a store; both must be uniform."""
    time = np.asarray(ds["time"].values, dtype=float)
    step = np.asarray(ds["step"].values, dtype=np.int64)
    if time.size < 2:
        raise AnalysisError(f"time axis: {time.size} frame(s); spectra and time series need at least 2")
    dt, ds_ = np.diff(time), np.diff(step)
    if np.abs(dt - dt[0]).max() > 1e-6 * abs(dt[0]) or (ds_ != ds_[0]).any() or dt[0] <= 0:
        bad = int(np.argmax(np.abs(dt - dt[0]) > 1e-6 * abs(dt[0]))) if np.abs(dt - dt[0]).max() > 0 else 0
        raise AnalysisError(f"time axis: frames are not evenly spaced (interval {dt[0]:g} fs, but {dt[bad]:g} fs "
                            f"after frame {bad}); spectra need a uniform time axis")
    return float(dt[0]), int(ds_[0])


# --------------------------------------------------------------------------- radial distribution


def species_pairs(species) -> tuple[list[str], list[tuple[str, str]]]:
    """Species in order of first appearance and their unordered pairs: water -> O-O, O-H, H-H."""
    kinds = list(dict.fromkeys(str(s) for s in species))
    pairs = [(a, b) for i, a in enumerate(kinds) for b in kinds[i:]]
    return kinds, pairs


@njit(cache=True, nogil=True)
def rdf_counts_kernel(pos, box, types, channel, r_max, n_bins):
    """Pair counts per frame, channel and distance bin: (F, n_channels, n_bins), int64.

    ``types[i]`` is the species index of atom i, ``channel[a, b]`` the output channel of a
    species pair; every unordered pair i < j within ``r_max`` (minimum image) is counted once.
    """
    n_frames, n = pos.shape[0], pos.shape[1]
    out = np.zeros((n_frames, channel.max() + 1, n_bins), dtype=np.int64)
    inv_dr = n_bins / r_max
    for f in range(n_frames):
        p = pos[f]
        for i in range(n - 1):
            for j in range(i + 1, n):
                _, dx, dy, dz, r, fc, dfc = pair_geometry(j, i, p, box, 0.0, 1.0)
                if r < r_max:
                    b = int(r * inv_dr)
                    if b < n_bins:
                        out[f, channel[types[i], types[j]], b] += 1
    return out


def _rdf_block(pos, box, types, channel, r_max, n_bins, norm):
    counts = rdf_counts_kernel(np.ascontiguousarray(pos, dtype=np.float64), box, types, channel, r_max, n_bins)
    g = np.divide(counts, norm, out=np.full(counts.shape, np.nan), where=norm > 0)   # NaN: no such pairs
    return g.astype(np.float32)


def rdf(ds: xr.Dataset, r_max: float = 6.0, bin_width: float = 0.02) -> xr.DataArray:
    """Radial distribution functions g(r) per frame and species pair (frame, pair, r), lazily.

    g(r) = counts in the shell / counts of an ideal gas of the same density; ``r_max`` must not
    exceed half the shortest box edge (minimum image). Its frame mean is the usual g(r).
    """
    box = _static_box(ds)
    if r_max > 0.5 * box.min() + 1e-9:
        raise AnalysisError(f"rdf: r_max {r_max} Å exceeds half the shortest box edge ({0.5 * box.min():.3f} Å)")
    n_bins = int(round(r_max / bin_width))
    edges = np.linspace(0.0, r_max, n_bins + 1)
    kinds, pairs = species_pairs(ds["species"].values)
    species = np.array([str(s) for s in ds["species"].values])
    types = np.array([kinds.index(s) for s in species], dtype=np.int64)
    channel = np.zeros((len(kinds), len(kinds)), dtype=np.int64)
    counts_of = np.bincount(types, minlength=len(kinds))
    volume = float(np.prod(box))
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    norm = np.empty((len(pairs), n_bins))
    for c, (a, b) in enumerate(pairs):
        ia, ib = kinds.index(a), kinds.index(b)
        channel[ia, ib] = channel[ib, ia] = c
        n_pairs = counts_of[ia] * (counts_of[ia] - 1) / 2 if ia == ib else counts_of[ia] * counts_of[ib]
        norm[c] = n_pairs * shell / volume
    out = xr.apply_ufunc(_rdf_block, ds["positions"], input_core_dims=[["atom", "xyz"]],
                         output_core_dims=[["pair", "r"]],
                         kwargs={"box": box, "types": types, "channel": channel, "r_max": float(r_max),
                                 "n_bins": n_bins, "norm": norm},
                         dask="parallelized", output_dtypes=[np.float32],
                         dask_gufunc_kwargs={"output_sizes": {"pair": len(pairs), "r": n_bins}})
    out = out.assign_coords(pair=np.array([f"{a}-{b}" for a, b in pairs], dtype=object),
                            r=0.5 * (edges[1:] + edges[:-1]))
    out["r"].attrs["units"] = "angstrom"
    out.attrs = {"units": "1", "long_name": "radial distribution function g(r) per frame",
                 "bin_width_angstrom": float(bin_width), "merge": MERGE["rdf"]}
    return out.rename("rdf")


def _static_box(ds: xr.Dataset) -> np.ndarray:
    if "frame" in ds["cell"].dims:
        raise AnalysisError("cell: changes per frame (NPT?); this analysis needs a fixed orthorhombic box")
    return orthorhombic_box(ds["cell"].values)


# --------------------------------------------------------------------------- spectra


def _psd_kernel(x, dt_fs, n_fft, n_keep):
    """One-sided power spectral density along the last axis, per cm^-1 (Hann window, mean removed).

    With Parseval: the sum over bins times the bin width (cm^-1) equals the variance of x.
    """
    w = np.hanning(x.shape[-1] + 2)[1:-1]                 # nonzero at both ends
    y = (x - x.mean(axis=-1, keepdims=True)) * w
    spec = np.abs(np.fft.rfft(y, n=n_fft, axis=-1)) ** 2
    spec *= 2.0 * dt_fs / (w * w).sum()                     # per (1/fs), one-sided
    spec[..., 0] *= 0.5
    if n_fft % 2 == 0:
        spec[..., -1] *= 0.5
    return spec[..., :n_keep] * SPEED_OF_LIGHT_CM_PER_FS   # per cm^-1


def power_spectrum(da: xr.DataArray, ds: xr.Dataset, window_frames: int, pad: int = 4) -> xr.DataArray:
    """Power spectral density of ``da`` (frame, ...) in non-overlapping windows of ``window_frames``.

    Windows start at absolute frame numbers (step / step interval) that are multiples of
    ``window_frames``, so pieces of one run cut at window boundaries give the same windows as
    the whole. Result (window, ..., wavenumber) in units of ``da``² per cm^-1, with coords
    ``window`` (first step of the window) and ``window_time`` (centre, fs). Zero padding by
    ``pad`` interpolates the frequency grid (resolution stays 1 / window length).
    """
    dt, dstep = _frame_interval(ds)
    nyquist = 1.0 / (2.0 * dt * SPEED_OF_LIGHT_CM_PER_FS)
    if nyquist < SPECTRUM_MAX_WAVENUMBER:
        raise AnalysisError(f"frames every {dt:g} fs resolve wavenumbers only up to {nyquist:.0f} cm^-1 "
                            f"(< {SPECTRUM_MAX_WAVENUMBER:.0f}); write frames at least every "
                            f"{1 / (2 * SPECTRUM_MAX_WAVENUMBER * SPEED_OF_LIGHT_CM_PER_FS):.2f} fs for spectra")
    if window_frames < 16:
        raise AnalysisError(f"window_frames must be >= 16, got {window_frames}")
    step = np.asarray(ds["step"].values, dtype=np.int64)
    first = int(step[0] // dstep)
    skip = (-first) % window_frames
    n_win = (step.size - skip) // window_frames
    if n_win < 1:
        raise AnalysisError(f"{step.size} frames hold no complete window of {window_frames} frames "
                            f"({window_frames * dt:g} fs) aligned to step multiples of {window_frames * dstep}")
    x = da.isel(frame=slice(skip, skip + n_win * window_frames))
    x = x.drop_vars([c for c in x.coords if "frame" in x[c].dims])
    windows = x.coarsen(frame=window_frames).construct(frame=("window", "lag"))
    if windows.chunks is not None:
        windows = windows.chunk({"lag": -1})
    n_fft = pad * window_frames
    freq = np.fft.rfftfreq(n_fft, d=dt) / SPEED_OF_LIGHT_CM_PER_FS
    n_keep = int(np.searchsorted(freq, SPECTRUM_MAX_WAVENUMBER, side="right"))
    out = xr.apply_ufunc(_psd_kernel, windows, input_core_dims=[["lag"]], output_core_dims=[["wavenumber"]],
                         kwargs={"dt_fs": dt, "n_fft": n_fft, "n_keep": n_keep}, dask="parallelized",
                         output_dtypes=[float], dask_gufunc_kwargs={"output_sizes": {"wavenumber": n_keep}})
    starts = step[skip:skip + n_win * window_frames:window_frames]
    times = np.asarray(ds["time"].values, dtype=float)[skip:skip + n_win * window_frames]
    out = out.assign_coords(window=starts, wavenumber=freq[:n_keep],
                            window_time=("window", times.reshape(n_win, window_frames).mean(axis=1)))
    out["wavenumber"].attrs["units"] = "cm^-1"
    out["window_time"].attrs["units"] = "fs"
    out["window"].attrs = {"units": "1", "long_name": "first MD step of the window"}
    out.attrs = {"window_frames": int(window_frames), "window_fs": float(window_frames * dt),
                 "resolution_cm^-1": float(1.0 / (window_frames * dt * SPEED_OF_LIGHT_CM_PER_FS))}
    return out


def peak_position(da: xr.DataArray, dim: str, band: tuple[float, float] | None = None) -> xr.DataArray:
    """Coordinate of the highest point of ``da`` along ``dim`` (within ``band``), refined by a
    parabola through the maximum and its neighbours; reduces ``dim``. NaN where the highest
    point is at an end of the range (a slope, not a peak)."""
    sel = da.sel({dim: slice(*band)}) if band is not None else da
    if sel.sizes[dim] < 3:
        raise AnalysisError(f"{dim} range {band} holds {sel.sizes[dim]} bins; need >= 3")

    def peak(y, k):
        top = np.argmax(y, axis=-1)
        i = np.clip(top, 1, y.shape[-1] - 2)
        y0, y1, y2 = (np.take_along_axis(y, (i + o)[..., None], -1)[..., 0] for o in (-1, 0, 1))
        den = y0 - 2 * y1 + y2
        shift = np.where(den < 0, 0.5 * (y0 - y2) / np.where(den < 0, den, -1.0), 0.0)
        at = np.interp(i + np.clip(shift, -0.5, 0.5), np.arange(k.size), k)
        return np.where((top == 0) | (top == y.shape[-1] - 1), np.nan, at)   # a maximum at the edge is no peak

    out = xr.apply_ufunc(peak, sel, kwargs={"k": sel[dim].values}, input_core_dims=[[dim]],
                         dask="parallelized", output_dtypes=[float])
    out.attrs = {"units": da[dim].attrs.get("units", "")}
    return out


def spectral_peak(spectrum: xr.DataArray, band: tuple[float, float] = OH_STRETCH_BAND) -> xr.DataArray:
    """Wavenumber (cm^-1) of the highest point of ``spectrum`` within ``band`` (default: O-H stretch)."""
    out = peak_position(spectrum, "wavenumber", band)
    out.attrs = {"units": "cm^-1", "band_cm^-1": list(band)}
    return out


def oh_spectrum(bonds: xr.DataArray, ds: xr.Dataset, window_frames: int) -> xr.DataArray:
    """Power spectrum of the O-H bond-length oscillations, averaged over bonds (window, wavenumber)."""
    out = power_spectrum(bonds, ds, window_frames).mean("bond")
    out.attrs.update(units="angstrom^2 cm", long_name="O-H bond-length power spectral density",
                     merge=MERGE["oh_spectrum"])
    return out.rename("oh_spectrum")


def vdos(ds: xr.Dataset, window_frames: int) -> xr.DataArray:
    """Vibrational density of states per species (window, species, wavenumber), per atom.

    The mass-weighted power spectrum of the velocities (the Fourier transform of the velocity
    autocorrelation), normalized per window and species to integrate to 3 (degrees of freedom
    per atom): by equipartition its integral is 3 k_B T, so this is the spectrum divided by
    k_B T of that window and species. Units 1/cm^-1.
    """
    mv2 = power_spectrum(ds["velocities"] * np.sqrt(ds["masses"]), ds, window_frames).sum("xyz")
    labels = xr.DataArray(np.array([str(s) for s in ds["species"].values], dtype=object), dims="atom",
                          name="species")
    per_species = mv2.drop_vars("species", errors="ignore").groupby(labels).mean()
    # the spectrum's own integral is the window's mean m v^2 (up to the cut above 5000 cm^-1), i.e. 3 k_B T
    kt = per_species.integrate("wavenumber") / 3.0
    out = (per_species / kt).transpose("window", "species", "wavenumber")
    out.attrs = {**mv2.attrs, "units": "cm", "long_name": "vibrational density of states per atom",
                 "normalization": "integral over wavenumber = 3 per atom", "merge": MERGE["vdos"]}
    return out.rename("vdos")


# --------------------------------------------------------------------------- histograms


def histogram(da: xr.DataArray, edges: np.ndarray, dim: str) -> xr.DataArray:
    """Counts of all values of ``da`` in the bins ``edges`` (dimension ``dim``, coordinate: bin
    centres), lazily for dask arrays; values outside the edges are not counted (their number is
    in ``attrs["outside"]`` once computed from the total). Partial histograms merge by summing."""
    import dask.array as dsa

    data = da.data
    if isinstance(data, dsa.Array):
        counts, _ = dsa.histogram(data.ravel(), bins=edges)
    else:
        counts, _ = np.histogram(np.asarray(data).ravel(), bins=edges)
    out = xr.DataArray(counts, dims=dim, coords={dim: 0.5 * (edges[1:] + edges[:-1])})
    out[dim].attrs = {"units": da.attrs.get("units", ""), "bin_width": float(edges[1] - edges[0])}
    out.attrs = {"units": "1", "long_name": f"histogram of {da.attrs.get('long_name', da.name)} (counts)",
                 "merge": "sum"}
    return out


# --------------------------------------------------------------------------- one statistics Dataset


def _kinetic(ds: xr.Dataset) -> tuple[xr.DataArray, xr.DataArray]:
    """The store's kinetic energy and temperature, or the same from the velocities (3N - 3 dof)."""
    if "kinetic_energy" in ds and "temperature" in ds:
        return ds["kinetic_energy"], ds["temperature"]
    ke = 0.5 * AMU_A2_PER_FS2_TO_EV * (ds["masses"] * (ds["velocities"] ** 2).sum("xyz")).sum("atom")
    temp = 2.0 * ke / ((3 * ds.sizes["atom"] - 3) * BOLTZMANN_EV_K)
    ke.attrs = {"units": "eV", "long_name": "kinetic energy"}
    temp.attrs = {"units": "K", "long_name": "temperature (3N - 3 degrees of freedom)"}
    return ke.rename("kinetic_energy"), temp.rename("temperature")


def analyze(ds: xr.Dataset, *, window_fs: float = 100.0, rdf_max: float = 6.0, rdf_bin: float = 0.02,
            molecules: Molecules | None = None, check_every: int = 100, source: str = "") -> xr.Dataset:
    """All statistics of one trajectory, lazily (dask), in one Dataset (schema ``ensemble.stats/1``).

    Per-frame series: kinetic_energy, temperature, species_temperature, oh_bond (+ _mean, _std),
    hoh_angle (+ _mean, _std), rdf. Histograms (summed): oh_bond_hist, hoh_angle_hist.
    Windowed (``window_fs``): oh_spectrum, oh_spectrum_peak, vdos.
    Spectra are left out, with the reason in ``attrs["spectra"]``, when frames are too far apart
    or too few for one window. ``source`` is recorded in the attrs.
    """
    mol = molecules or assign_molecules(ds)
    bonds = oh_bonds(ds, mol, check_every=check_every)
    angles = hoh_angles(ds, mol)
    ke, temp = _kinetic(ds)
    out = xr.Dataset({
        "kinetic_energy": ke, "temperature": temp,
        "oh_bond": bonds, "oh_bond_mean": bonds.mean("bond"), "oh_bond_std": bonds.std("bond"),
        "hoh_angle": angles, "hoh_angle_mean": angles.mean("molecule"), "hoh_angle_std": angles.std("molecule"),
        "rdf": rdf(ds, r_max=min(rdf_max, 0.5 * float(_static_box(ds).min())), bin_width=rdf_bin),
    })
    out = out.drop_vars([c for c in ("species", "masses") if c in out.coords])    # per-atom coords
    out["species_temperature"] = species_temperature(ds)
    out["oh_bond_hist"] = histogram(bonds, BOND_EDGES, "oh_bond_bin")
    out["hoh_angle_hist"] = histogram(angles, ANGLE_EDGES, "hoh_angle_bin")
    for name, (units, long) in {"oh_bond_mean": ("angstrom", "mean O-H bond length"),
                                "oh_bond_std": ("angstrom", "standard deviation of O-H bond lengths"),
                                "hoh_angle_mean": ("deg", "mean H-O-H angle"),
                                "hoh_angle_std": ("deg", "standard deviation of H-O-H angles")}.items():
        out[name].attrs = {"units": units, "long_name": long}
    spectra = "computed"
    try:
        dt, _ = _frame_interval(ds)
        window = int(round(window_fs / dt))
        spec = oh_spectrum(bonds, ds, window)
        out["oh_spectrum"] = spec
        out["oh_spectrum_peak"] = spectral_peak(spec)
        out["oh_spectrum_peak"].attrs.update(long_name="O-H stretch peak per window", merge=MERGE["oh_spectrum_peak"])
        out["vdos"] = vdos(ds, window)
    except AnalysisError as exc:
        spectra = f"not computed: {exc}"
    for name in out.data_vars:
        out[name].attrs.setdefault("merge", MERGE[name])
    out["bond_oxygen"] = ("bond", np.repeat(mol.oxygen, 2))
    out["bond_hydrogen"] = ("bond", mol.hydrogens.reshape(-1))
    for name in ("bond_oxygen", "bond_hydrogen"):
        out[name].attrs = {"units": "1", "long_name": f"atom index of the bond's {name.split('_')[1]}",
                           "merge": "identical"}
    out["time"].attrs["units"] = "fs"
    out.attrs = {"schema": STATS_SCHEMA, "source": source, "title": ds.attrs.get("title", ""),
                 "source_status": ds.attrs.get("status", "complete"), "n_atoms": int(ds.sizes["atom"]),
                 "box_angstrom": [float(b) for b in _static_box(ds)], "window_fs": float(window_fs),
                 "spectra": spectra, "created_by": f"ensemble {__version__} analyze"}
    return out


def merge(parts):
    """Merge partial results (DataArrays or statistics Datasets) by their declared rules.

    ``concat(frame)`` / ``concat(window)`` concatenate in the given order; ``sum`` adds
    (histograms); ``identical`` variables must agree and are kept once. Pieces cut at window boundaries merge to exactly
    the analysis of the whole.
    """
    if isinstance(parts[0], xr.DataArray):
        rule = parts[0].attrs.get("merge", "")
        if rule == "sum":
            return sum(parts[1:], parts[0]).assign_attrs(parts[0].attrs)
        if not rule.startswith("concat("):
            raise ValueError(f"{parts[0].name}: no merge rule {rule!r}")
        out = xr.concat(parts, dim=rule[len("concat("):-1])
        out.attrs = dict(parts[0].attrs)
        return out
    merged = {}
    for name in parts[0].data_vars:
        rule = parts[0][name].attrs.get("merge", "")
        if rule == "identical":
            for p in parts[1:]:
                if not np.array_equal(p[name].values, parts[0][name].values):
                    raise ValueError(f"{name}: differs between the pieces; they are not from one run")
            merged[name] = parts[0][name]
        elif rule.startswith("concat("):
            merged[name] = merge([p[name] for p in parts if name in p])
        elif rule == "sum":
            total = parts[0][name]
            for p in parts[1:]:
                total = total + p[name]
            merged[name] = total.assign_attrs(parts[0][name].attrs)
        else:
            raise ValueError(f"{name}: no merge rule {rule!r}")
    out = xr.Dataset(merged)
    out.attrs = dict(parts[0].attrs)
    return out


def write_stats(stats: xr.Dataset, out: str | Path, overwrite: bool = False) -> Path:
    """Compute ``stats`` (dask, in parallel) and write it atomically as a zarr v3 store."""
    from .io.store import atomic_output
    out = Path(out)
    # regular chunks (zarr needs them): frames in blocks, everything else whole
    stats = stats.chunk({d: (min(STATS_CHUNK_FRAMES, n) if d == "frame" else -1) for d, n in stats.sizes.items()})
    for v in stats.variables.values():
        v.encoding = {}
    with atomic_output(out, overwrite=overwrite) as tmp:
        stats.to_zarr(tmp, mode="w", consolidated=False, zarr_format=3)
    return out


def open_stats(path: str | Path) -> xr.Dataset:
    """Open a statistics store written by :func:`write_stats` (loaded: statistics are small)."""
    path = Path(path)
    if not path.exists():
        raise AnalysisError(f"{path}: no such statistics store")
    ds = xr.open_zarr(path, consolidated=False, zarr_format=3)
    if ds.attrs.get("schema") != STATS_SCHEMA:
        raise AnalysisError(f"{path}: attrs['schema'] is {ds.attrs.get('schema')!r}; expected {STATS_SCHEMA!r}")
    return ds.load()


# --------------------------------------------------------------------------- derived figures


def block_average(series, n_blocks: int = 8) -> tuple[float, float]:
    """Mean of a time series and its standard error from ``n_blocks`` contiguous block means.

    Blocks longer than the correlation time make the block means independent, so the error
    accounts for time correlation (Flyvbjerg & Petersen 1989). NaN error with < 2 blocks.
    """
    x = np.asarray(series, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    n_blocks = min(n_blocks, x.size)
    if n_blocks < 2:
        return float(x.mean()), float("nan")
    size = x.size // n_blocks
    means = x[:size * n_blocks].reshape(n_blocks, size).mean(axis=1)
    return float(x.mean()), float(means.std(ddof=1) / np.sqrt(n_blocks))


H_STRETCH_BAND = (2500.0, 4500.0)   #: cm^-1, O-H stretch in the H VDOS
H_BEND_BAND = (1000.0, 2500.0)      #: cm^-1, H-O-H bend in the H VDOS


def run_scalars(stats: xr.Dataset, n_blocks: int = 8) -> dict[str, tuple[str, str, tuple[float, float]]]:
    """Time-averaged figures of one run with standard errors: key -> (label, units, (mean, err)).

    Per-frame series: block averages over ``n_blocks`` time blocks. Spectral peaks: mean and
    standard error over spectrum windows. g(r) first-peak positions: from g(r) averaged in each
    time block.
    """
    rows = {"temperature": ("temperature", "K", block_average(stats["temperature"].values, n_blocks))}
    for s in stats["species"].values:
        rows[f"temperature_{s}"] = (f"temperature {s}", "K",
                                    block_average(stats["species_temperature"].sel(species=s).values, n_blocks))
    for name, label, units in (("oh_bond_mean", "O-H bond mean", "angstrom"), ("oh_bond_std", "O-H bond std", "angstrom"),
                               ("hoh_angle_mean", "H-O-H angle mean", "deg"),
                               ("hoh_angle_std", "H-O-H angle std", "deg")):
        rows[name] = (label, units, block_average(stats[name].values, n_blocks))
    if "oh_spectrum_peak" in stats:
        peaks = stats["oh_spectrum_peak"].values
        rows["oh_stretch_peak"] = ("O-H stretch peak (bond spectrum)", "cm^-1", block_average(peaks, peaks.size))
        if "H" in stats["vdos"]["species"].values:
            for key, label, band in (("vdos_H_stretch_peak", "H stretch peak (VDOS)", H_STRETCH_BAND),
                                     ("vdos_H_bend_peak", "H bend peak (VDOS)", H_BEND_BAND)):
                p = spectral_peak(stats["vdos"].sel(species="H"), band).values
                rows[key] = (label, "cm^-1", block_average(p, p.size))
    g = stats["rdf"]
    nb = max(1, min(n_blocks, g.sizes["frame"]))
    blocks = np.array_split(np.arange(g.sizes["frame"]), nb)
    for pair in g["pair"].values:
        gp = g.sel(pair=pair)
        if np.isnan(gp.values).all():
            continue
        pos = [float(peak_position(gp.isel(frame=b).mean("frame"), "r")) for b in blocks]
        rows[f"rdf_peak_{pair}"] = (f"g(r) {pair} peak position", "angstrom", block_average(pos, nb))
    return rows


def rdf_area(g: xr.DataArray, g_ref: xr.DataArray, r_max: float = 6.0) -> xr.DataArray:
    """Area between two g(r) (pair, r) over 0 < r < r_max, Å, per pair (ref interpolated onto g's r)."""
    g_ref = g_ref.interp(r=g["r"])
    diff = np.abs(g - g_ref).where(g["r"] <= r_max, drop=True)
    return diff.integrate("r")


def time_to_failure(stats: xr.Dataset, reference: xr.Dataset | None = None, *, bond_max: float = 2.0,
                    rdf_area_max: float = 3.0, rdf_window_fs: float = 1000.0) -> dict:
    """When a run fails, in fs since its first frame (None if it does not).

    Criteria: the first frame with an O-H bond longer than ``bond_max``; with a ``reference``,
    the first window of ``rdf_window_fs`` whose mean g(r) differs from the reference's by an
    area (0-6 Å, any species pair) above ``rdf_area_max`` (Fu et al. 2023); a run whose
    source stopped (``source_status`` failed) fails at its last frame at the latest.
    """
    t = np.asarray(stats["time"].values, dtype=float)
    t = t - t[0]
    found: list[tuple[float, str]] = []
    over = np.asarray((stats["oh_bond"] > bond_max).any("bond").values)
    if over.any():
        f = int(np.argmax(over))
        found.append((float(t[f]), f"O-H bond beyond {bond_max} Å (bond {int(np.argmax(stats['oh_bond'].values[f]))})"))
    areas = []
    if reference is not None:
        g_ref = reference["rdf"].mean("frame")
        n_win = max(1, int(t[-1] // rdf_window_fs)) if t[-1] > 0 else 1
        for w in range(n_win):
            sel = (t >= w * rdf_window_fs) & ((t < (w + 1) * rdf_window_fs) | (n_win == 1))
            area = rdf_area(stats["rdf"].isel(frame=np.flatnonzero(sel)).mean("frame"), g_ref)
            areas.append(float(area.max()))
            if areas[-1] > rdf_area_max:
                pair = str(area["pair"].values[int(np.argmax(area.values))])
                found.append((w * rdf_window_fs, f"g(r) area {areas[-1]:.2f} > {rdf_area_max} for {pair}"))
                break
    status = str(stats.attrs.get("source_status", "complete"))
    if status.startswith("failed"):
        found.append((float(t[-1]), f"run stopped: {status}"))
    duration = float(t[-1])
    if not found:
        return {"failed": False, "time_fs": None, "criterion": None, "duration_fs": duration,
                "rdf_area_max_per_window": areas}
    time_fs, why = min(found)
    return {"failed": True, "time_fs": time_fs, "criterion": why, "duration_fs": duration,
            "rdf_area_max_per_window": areas}


def stats_summary_json(stats: xr.Dataset) -> str:
    """A few headline numbers of a statistics Dataset, as JSON (for logs and the runner)."""
    out = {"frames": int(stats.sizes["frame"]), "temperature_K": float(stats["temperature"].mean()),
           "oh_bond_angstrom": float(stats["oh_bond_mean"].mean()),
           "hoh_angle_deg": float(stats["hoh_angle_mean"].mean())}
    if "oh_spectrum" in stats:
        out["oh_stretch_peak_cm^-1"] = float(spectral_peak(stats["oh_spectrum"].mean("window")))
    return json.dumps(out)


# --------------------------------------------------------------------------- across ensemble members


def aggregate_members(stats: dict[str, xr.Dataset], meta: dict[str, dict], *, reference: xr.Dataset | None = None,
                      n_blocks: int = 8) -> xr.Dataset:
    """Merge the statistics of ensemble members into one Dataset with a ``member`` dimension.

    Per member (coords ``model``, ``temperature_K``, ``tile``, ``seed``, ``status`` from
    ``meta``): the time-averaged figures of :func:`run_scalars` with their errors
    (``<key>`` and ``<key>_err``), the time to failure (against ``reference`` when given),
    the per-frame series (``<name>_series``) on a common axis of time since the member's start
    (``run_time``; NaN beyond a member's end), and the time-averaged g(r), O-H spectrum and VDOS.
    Members whose runs differ in length or box size line up with NaN padding.
    """
    ids = list(stats)
    if not ids:
        raise AnalysisError("no member statistics to aggregate")
    per = []
    for mid in ids:
        s = stats[mid]
        t = np.asarray(s["time"].values, float)
        series = s[["temperature", "species_temperature", "oh_bond_mean", "oh_bond_std", "hoh_angle_mean",
                    "hoh_angle_std"]].drop_vars(["step", "time"]).assign_coords(run_time=("frame", t - t[0]))
        series = series.swap_dims(frame="run_time")
        series = series.rename({v: f"{v}_series" for v in series.data_vars})     # the scalars keep the plain names
        scalars = run_scalars(s, n_blocks)
        data = {k: xr.DataArray(v[2][0], attrs={"units": v[1], "long_name": v[0]}) for k, v in scalars.items()}
        data.update({f"{k}_err": xr.DataArray(v[2][1], attrs={"units": v[1], "long_name": f"standard error of {v[0]}"})
                     for k, v in scalars.items()})
        ttf = time_to_failure(s, reference)
        data["time_to_failure"] = xr.DataArray(np.nan if ttf["time_fs"] is None else ttf["time_fs"],
                                               attrs={"units": "fs", "long_name": "time to failure (NaN: none)",
                                                      "criteria": "O-H > 2 Å; g(r) area > 3 in 1 ps; run stopped"})
        data["duration"] = xr.DataArray(ttf["duration_fs"], attrs={"units": "fs", "long_name": "run length"})
        data["rdf_mean"] = s["rdf"].mean("frame").astype(float)
        if "oh_spectrum" in s:
            data["oh_spectrum_mean"] = s["oh_spectrum"].mean("window")
            data["vdos_mean"] = s["vdos"].mean("window")
        ds = xr.Dataset({**{k: v.drop_vars([c for c in v.coords if c in ("window_time",)], errors="ignore")
                            for k, v in data.items()}, **series.data_vars})
        per.append(ds.drop_vars([c for c in ds.coords if c not in ds.dims], errors="ignore"))
    out = xr.concat(per, dim="member", join="outer", coords="minimal", compat="override", combine_attrs="drop")
    info = {k: [meta[m][k] for m in ids] for k in ("model", "temperature_K", "tile", "seed", "status")}
    out = out.assign_coords(member=np.array(ids, dtype=object),
                            model=("member", np.array(info["model"], dtype=object)),
                            temperature_K=("member", np.array(info["temperature_K"], float)),
                            tile=("member", np.array(info["tile"], int)), seed=("member", np.array(info["seed"], int)),
                            status=("member", np.array(info["status"], dtype=object)))
    out["run_time"].attrs["units"] = "fs"
    out["temperature_K"].attrs = {"units": "K", "long_name": "thermostat target"}
    for name in ("rdf_mean", "oh_spectrum_mean", "vdos_mean"):
        if name in out:
            out[name].attrs["units"] = {"rdf_mean": "1", "oh_spectrum_mean": "angstrom^2 cm", "vdos_mean": "cm"}[name]
    for name in out.data_vars:
        src = name.removesuffix("_series")
        out[name].attrs.setdefault("units", stats[ids[0]][src].attrs.get("units", "1") if src in stats[ids[0]]
                                   else "1")
        out[name].attrs["merge"] = "concat(member)"
    out.attrs = {"schema": "ensemble.aggregate/1", "n_blocks": n_blocks, "created_by": f"ensemble {__version__}"}
    return out
