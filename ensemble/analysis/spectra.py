"""Spectra in time windows: the O-H bond-length power spectrum (paper Fig. 6) and the VDOS.

Windows are non-overlapping, ``window_frames`` long, and start at absolute step multiples, so
pieces of one run cut at window boundaries give exactly the windows of the whole (merge:
concatenate along ``window``). Each window is Hann-tapered, zero-padded by ``pad`` and
Fourier transformed; Parseval holds (the integral over wavenumber is the variance).

Resolution: a window of T fs resolves 1 / (c T) cm^-1 (333 cm^-1 for 100 fs); zero padding
only interpolates the grid (``pad`` x finer) and does not sharpen anything. Both numbers are
attributes of every spectrum (``resolution_cm^-1``, ``grid_cm^-1``) and the report prints
the resolution beside each peak.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..units import SPEED_OF_LIGHT_CM_PER_FS
from .topology import AnalysisError

__all__ = ["frame_interval", "power_spectrum", "peak_position", "spectral_peak", "oh_spectrum", "vdos",
           "SPECTRUM_MAX_WAVENUMBER", "OH_STRETCH_BAND", "H_STRETCH_BAND", "H_BEND_BAND", "DEFAULT_PAD"]

#: spectra need frames at least this often: the O-H stretch (~3700 cm^-1) must lie below Nyquist
SPECTRUM_MAX_WAVENUMBER = 5000.0
OH_STRETCH_BAND = (2500.0, 4500.0)         #: cm^-1, where the O-H stretch peak is looked for
H_STRETCH_BAND = (2500.0, 4500.0)          #: cm^-1, O-H stretch in the H VDOS
H_BEND_BAND = (1000.0, 2500.0)             #: cm^-1, H-O-H bend in the H VDOS
DEFAULT_PAD = 4                            #: zero padding factor of each window


def frame_interval(ds: xr.Dataset) -> tuple[float, int]:
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


def power_spectrum(da: xr.DataArray, ds: xr.Dataset, window_frames: int, pad: int = DEFAULT_PAD) -> xr.DataArray:
    """Power spectral density of ``da`` (frame, ...) in non-overlapping windows of ``window_frames``.

    Windows start at absolute frame numbers (step / step interval) that are multiples of
    ``window_frames``, so pieces of one run cut at window boundaries give the same windows as
    the whole. Result (window, ..., wavenumber) in units of ``da``² per cm^-1, with coords
    ``window`` (first step of the window) and ``window_time`` (centre, fs). Zero padding by
    ``pad`` interpolates the frequency grid (resolution stays 1 / window length).
    """
    dt, dstep = frame_interval(ds)
    nyquist = 1.0 / (2.0 * dt * SPEED_OF_LIGHT_CM_PER_FS)
    if nyquist < SPECTRUM_MAX_WAVENUMBER:
        raise AnalysisError(f"frames every {dt:g} fs resolve wavenumbers only up to {nyquist:.0f} cm^-1 "
                            f"(< {SPECTRUM_MAX_WAVENUMBER:.0f}); write frames at least every "
                            f"{1 / (2 * SPECTRUM_MAX_WAVENUMBER * SPEED_OF_LIGHT_CM_PER_FS):.2f} fs for spectra")
    if window_frames < 16:
        raise AnalysisError(f"a spectrum window must hold >= 16 frames, got {window_frames} "
                            f"({window_frames * dt:g} fs at {dt:g} fs per frame)")
    if not (isinstance(pad, (int, np.integer)) and 1 <= pad <= 64):
        raise AnalysisError(f"pad (zero padding factor) must be an integer in 1..64, got {pad!r}")
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
    resolution = float(1.0 / (window_frames * dt * SPEED_OF_LIGHT_CM_PER_FS))
    out.attrs = {"window_frames": int(window_frames), "window_fs": float(window_frames * dt), "pad": int(pad),
                 "resolution_cm^-1": resolution, "grid_cm^-1": resolution / pad}
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


def oh_spectrum(bonds: xr.DataArray, ds: xr.Dataset, window_frames: int, pad: int = DEFAULT_PAD) -> xr.DataArray:
    """Power spectrum of the O-H bond-length oscillations, averaged over hydrogens (window, wavenumber).

    ``bonds`` (frame, hydrogen): each H's distance to its current nearest O, continuous through
    proton hops."""
    other = [d for d in bonds.dims if d != "frame"]
    out = power_spectrum(bonds, ds, window_frames, pad).mean(other)
    out.attrs.update(units="angstrom^2 cm", long_name="O-H bond-length power spectral density")
    return out.rename("oh_spectrum")


def vdos(ds: xr.Dataset, window_frames: int, pad: int = DEFAULT_PAD) -> xr.DataArray:
    """Vibrational density of states per species (window, species, wavenumber), per atom.

    The mass-weighted power spectrum of the velocities (the Fourier transform of the velocity
    autocorrelation), normalized per window and species to integrate to 3 (degrees of freedom
    per atom): by equipartition its integral is 3 k_B T, so this is the spectrum divided by
    k_B T of that window and species. Units 1/cm^-1.
    """
    mv2 = power_spectrum(ds["velocities"] * np.sqrt(ds["masses"]), ds, window_frames, pad).sum("xyz")
    labels = xr.DataArray(np.array([str(s) for s in ds["species"].values], dtype=object), dims="atom",
                          name="species")
    per_species = mv2.drop_vars("species", errors="ignore").groupby(labels).mean()
    # the spectrum's own integral is the window's mean m v^2 (up to the cut above 5000 cm^-1), i.e. 3 k_B T
    kt = per_species.integrate("wavenumber") / 3.0
    out = (per_species / kt.where(kt > 0))         # a species at rest has no spectrum to normalize: NaN.transpose("window", "species", "wavenumber")
    out.attrs = {**mv2.attrs, "units": "cm", "long_name": "vibrational density of states per atom",
                 "normalization": "integral over wavenumber = 3 per atom"}
    return out.rename("vdos")
