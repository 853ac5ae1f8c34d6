"""Diagnostics of an integrator's run, alone and against a fine-step reference run.

Alone (:func:`run_diagnostics`, every ``ensemble simulate`` prints it): drift of the conserved
energy (NVE: kinetic + the conservative model's potential energy; a least-squares slope, per
atom), mean temperature per species and the equipartition gap |T_H - T_O| / T (block averages
with standard errors), fixed-point iterations per step (action integrator).

Against a reference (:func:`compare_runs`, ``ensemble compare-dynamics``), usually a 0.5 fs
velocity-Verlet run of the same model from the same state: O-H bond and H-O-H angle means and
widths, g(r) first-peak positions (all with block-average standard errors, through
:func:`ensemble.analysis.analyze` and :func:`ensemble.analysis.run_scalars`), the area between
the mean g(r) (:func:`ensemble.analysis.rdf_area`), and the vibrational density of states per
species up to the Nyquist frequency of the coarser run (a long step cannot resolve more), with
its peak positions per band and the distance between the normalised spectra.
"""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr

from .analysis import analyze, block_average, rdf_area, run_scalars, stability
from .io.store import open_trajectory
from . import thermo
from .units import SPEED_OF_LIGHT_CM_PER_FS

__all__ = ["run_diagnostics", "compare_runs", "vdos_upto", "format_comparison"]

#: cm^-1 bands whose VDOS peaks are compared, cut at the Nyquist frequency (the stretch band is wide:
#: a long step may move it far down)
BANDS = {"libration": (300.0, 1100.0), "bend": (1300.0, 1900.0), "stretch": (2000.0, 4500.0)}


def _series(ds: xr.Dataset, name: str) -> np.ndarray:
    return np.asarray(ds[name].values, float) if name in ds else np.array([])


def run_diagnostics(store, n_blocks: int = 8) -> dict:
    """Energy drift, per-species temperatures and equipartition, fixed-point iterations of a
    simulation store (``ensemble simulate`` output)."""
    ds = open_trajectory(store) if not isinstance(store, xr.Dataset) else store
    n_atoms = ds.sizes["atom"]
    out: dict = {"atoms": int(n_atoms), "status": str(ds.attrs.get("status", ""))}
    settings = ds.attrs.get("simulation_settings")
    if settings:
        import json

        s = json.loads(settings)
        out.update(integrator=s.get("integrator", "verlet"), dt_fs=s.get("dt_fs"),
                   ensemble="NVE" if s.get("temperature_K") is None else f"NVT {s['temperature_K']:g} K")
    if "thermo_conserved" in ds:
        e = _series(ds, "thermo_conserved")
        t = np.asarray(ds["md_step"].values, float) * float(out.get("dt_fs") or ds.attrs.get("timestep_fs", 0.5))
    else:
        e = _series(ds, "conserved_energy")
        t = np.asarray(ds["time"].values, float)
    ok = np.isfinite(e)
    if ok.sum() >= 3 and np.ptp(t[ok]) > 0:
        slope = np.polyfit(t[ok] * 1e-3, e[ok], 1)[0]                    # eV / ps
        out["energy_drift_meV_per_atom_ps"] = float(1e3 * slope / n_atoms)
        out["energy_fluctuation_meV_per_atom"] = float(1e3 * np.std(e[ok] - np.polyval(np.polyfit(t[ok] * 1e-3,
                                                                                                   e[ok], 1),
                                                                                        t[ok] * 1e-3)) / n_atoms)
        out["energy_change_meV_per_atom"] = float(1e3 * (e[ok][-1] - e[ok][0]) / n_atoms)
        out["duration_ps"] = float(np.ptp(t[ok]) * 1e-3)
    temps = {}
    for name in ds.data_vars:
        if name.startswith("thermo_temperature_"):
            temps[name.removeprefix("thermo_temperature_")] = block_average(ds[name].values, n_blocks)
    if not temps and "velocities" in ds:
        ke = xr.apply_ufunc(thermo.atom_kinetic_energy, ds["velocities"], ds["masses"],
                            input_core_dims=[["atom", "xyz"], ["atom"]], output_core_dims=[["atom"]],
                            dask="parallelized", output_dtypes=[float])
        for s in sorted(set(str(x) for x in ds["species"].values)):
            sel = np.array([str(x) == s for x in ds["species"].values])
            # per atom 3 degrees of freedom: T = 2 <KE_atom> / (3 k_B)
            temps[s] = block_average(thermo.temperature(ke.isel(atom=np.flatnonzero(sel)).mean("atom").values, 3),
                                     n_blocks)
    out["temperature_species_K"] = {k: {"mean": v[0], "stderr": v[1]} for k, v in temps.items()}
    if "thermo_temperature" in ds:
        out["temperature_K"] = dict(zip(("mean", "stderr"), block_average(ds["thermo_temperature"].values, n_blocks)))
    if {"H", "O"} <= set(temps) and "temperature_K" in out:
        out["equipartition_gap"] = float(abs(temps["H"][0] - temps["O"][0]) / out["temperature_K"]["mean"])
    if "thermo_iterations" in ds:
        it = np.asarray(ds["thermo_iterations"].values)
        res = _series(ds, "thermo_residual")
        out["iterations_per_step"] = {"mean": float(it.mean()), "max": int(it.max()),
                                      "max_residual_angstrom": float(np.nanmax(res)) if res.size else None}
    return out


def vdos_upto(ds: xr.Dataset, max_wavenumber: float, window_fs: float = 400.0) -> xr.DataArray:
    """Vibrational density of states per species (species, wavenumber), mass-weighted velocity
    power spectra in Hann windows of ``window_fs``, averaged over windows and atoms, up to
    ``max_wavenumber`` cm^-1 (at most the Nyquist frequency of the frames), normalised to unit
    area per species over that range."""
    t = np.asarray(ds["time"].values, float)
    dt = float(np.median(np.diff(t)))
    nyquist = 1.0 / (2.0 * dt * SPEED_OF_LIGHT_CM_PER_FS)
    top = min(float(max_wavenumber), nyquist)
    n_win = max(int(round(window_fs / dt)), 8)
    n_full = t.size // n_win
    if n_full < 1:
        raise ValueError(f"{t.size} frames of {dt:g} fs hold no window of {window_fs:g} fs")
    v = np.asarray(ds["velocities"].values[:n_full * n_win], float) * np.sqrt(np.asarray(ds["masses"].values))[None, :, None]
    v = v.reshape(n_full, n_win, v.shape[1], 3)
    w = np.hanning(n_win + 2)[1:-1]
    spec = np.abs(np.fft.rfft((v - v.mean(axis=1, keepdims=True)) * w[None, :, None, None], n=4 * n_win,
                              axis=1)) ** 2
    freq = np.fft.rfftfreq(4 * n_win, d=dt) / SPEED_OF_LIGHT_CM_PER_FS
    keep = freq <= top
    spec = spec[:, keep].sum(axis=3).mean(axis=0)               # (wavenumber, atom)
    species = np.array([str(s) for s in ds["species"].values])
    names = sorted(set(species))
    out = np.stack([spec[:, species == s].mean(axis=1) for s in names])
    dk = freq[1] - freq[0]
    out /= out.sum(axis=1, keepdims=True) * dk
    da = xr.DataArray(out, dims=("species", "wavenumber"), coords={"species": names, "wavenumber": freq[keep]},
                      attrs={"units": "cm", "long_name": "VDOS per species, unit area up to max_wavenumber",
                             "nyquist_cm^-1": nyquist, "window_fs": n_win * dt})
    da["wavenumber"].attrs["units"] = "cm^-1"
    return da


def _peak(spectrum: np.ndarray, k: np.ndarray, band) -> float:
    sel = (k >= band[0]) & (k <= band[1])
    if sel.sum() < 3:
        return float("nan")
    y, kk = spectrum[sel], k[sel]
    i = int(np.argmax(y))
    if i in (0, y.size - 1):
        return float("nan")
    den = y[i - 1] - 2 * y[i] + y[i + 1]
    shift = 0.5 * (y[i - 1] - y[i + 1]) / den if den < 0 else 0.0
    return float(kk[i] + shift * (kk[1] - kk[0]))


def compare_runs(run, reference, *, n_blocks: int = 8, window_fs: float = 400.0, skip_ps: float = 0.0) -> dict:
    """Statistics of ``run`` against ``reference`` (trajectory stores): for each figure the two
    means with standard errors, the difference and z = difference / combined error."""
    ds = open_trajectory(run) if not isinstance(run, xr.Dataset) else run
    ref = open_trajectory(reference) if not isinstance(reference, xr.Dataset) else reference
    if skip_ps > 0:
        ds = ds.where(ds["time"] >= ds["time"][0] + 1e3 * skip_ps, drop=True)
        ref = ref.where(ref["time"] >= ref["time"][0] + 1e3 * skip_ps, drop=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st_run = analyze(ds, window_fs=100.0).compute()
        st_ref = analyze(ref, window_fs=100.0).compute()
    a, b = run_scalars(st_run, n_blocks), run_scalars(st_ref, n_blocks)
    rows = {}
    for key in ("oh_bond_mean", "oh_bond_std", "hoh_angle_mean", "hoh_angle_std", "rdf_peak_O-O", "rdf_peak_O-H",
                "rdf_peak_H-H", "temperature", "temperature_H", "temperature_O"):
        if key in a and key in b:
            label, units, (m1, e1) = a[key].label, a[key].units, a[key].value
            m2, e2 = b[key].value
            err = float(np.hypot(e1, e2)) if np.isfinite(e1) and np.isfinite(e2) else float("nan")
            rows[key] = {"label": label, "units": units, "run": m1, "run_stderr": e1, "reference": m2,
                         "reference_stderr": e2, "difference": m1 - m2,
                         "z": (m1 - m2) / err if err and np.isfinite(err) else float("nan")}
    area = rdf_area(st_run["rdf"].mean("frame"), st_ref["rdf"].mean("frame"))
    # the reference's own statistical noise in the same measure: its first half against its second half
    half = st_ref.sizes["frame"] // 2
    noise = rdf_area(st_ref["rdf"].isel(frame=slice(0, half)).mean("frame"),
                     st_ref["rdf"].isel(frame=slice(half, None)).mean("frame"))
    out = {"figures": rows,
           "rdf_area": {str(p): float(v) for p, v in zip(area["pair"].values, area.values)},
           "rdf_area_reference_halves": {str(p): float(v) for p, v in zip(noise["pair"].values, noise.values)},
           "stability": stability(st_run, st_ref)}
    dt_run = float(np.median(np.diff(ds["time"].values)))
    dt_ref = float(np.median(np.diff(ref["time"].values)))
    top = 1.0 / (2.0 * max(dt_run, dt_ref) * SPEED_OF_LIGHT_CM_PER_FS)
    span = min(float(np.ptp(ds["time"].values)), float(np.ptp(ref["time"].values)))
    window_fs = min(window_fs, 0.5 * span)
    vdos = {"max_wavenumber_cm^-1": top, "window_fs": window_fs, "species": {}}
    if window_fs < 8 * max(dt_run, dt_ref):
        vdos["skipped"] = f"runs of {span:g} fs are too short for a spectrum"
        out["vdos"] = vdos
        out["run"] = run_diagnostics(ds, n_blocks)
        out["reference"] = run_diagnostics(ref, n_blocks)
        return out
    v1, v2 = vdos_upto(ds, top, window_fs), vdos_upto(ref, top, window_fs)
    k = v1["wavenumber"].values
    for s in v1["species"].values:
        y1 = v1.sel(species=s).values
        y2 = np.interp(k, v2["wavenumber"].values, v2.sel(species=s).values)
        dk = k[1] - k[0]
        entry = {"l1_distance": float(np.sum(np.abs(y1 - y2)) * dk)}
        for band, lim in BANDS.items():
            if lim[0] < top:
                lim = (lim[0], min(lim[1], top))
                entry[f"{band}_peak_run_cm^-1"] = _peak(y1, k, lim)
                entry[f"{band}_peak_reference_cm^-1"] = _peak(y2, k, lim)
        vdos["species"][str(s)] = entry
    out["vdos"] = vdos
    out["run"] = run_diagnostics(ds, n_blocks)
    out["reference"] = run_diagnostics(ref, n_blocks)
    return out


def format_comparison(c: dict) -> str:
    """Markdown table of :func:`compare_runs`."""
    lines = ["| figure | run | reference | difference | z |", "|---|---|---|---|---|"]
    for r in c["figures"].values():
        lines.append(f"| {r['label']} ({r['units']}) | {r['run']:.4g} ± {r['run_stderr']:.2g} | "
                     f"{r['reference']:.4g} ± {r['reference_stderr']:.2g} | {r['difference']:+.3g} | {r['z']:+.1f} |")
    lines.append("")
    lines.append("g(r) area |g - g_ref| (Å), run vs reference / reference first half vs second half: "
                 + ", ".join(f"{p} {v:.3f} / {c['rdf_area_reference_halves'][p]:.3f}" for p, v in c["rdf_area"].items()))
    v = c["vdos"]
    parts = [v["skipped"]] if "skipped" in v else []
    for s, e in v["species"].items():
        peaks = ", ".join(f"{b} {e[f'{b}_peak_run_cm^-1']:.0f} vs {e[f'{b}_peak_reference_cm^-1']:.0f}"
                          for b in BANDS if f"{b}_peak_run_cm^-1" in e)
        parts.append(f"{s}: L1 {e['l1_distance']:.3f}" + (f"; peaks (cm^-1) {peaks}" if peaks else ""))
    lines.append(f"VDOS up to {v['max_wavenumber_cm^-1']:.0f} cm^-1 (the coarser run's Nyquist): " + "; ".join(parts))
    for name in ("run", "reference"):
        d = c[name]
        eq = d.get("equipartition_gap")
        lines.append(f"{name}: {d.get('integrator', '?')} {d.get('dt_fs', '?')} fs {d.get('ensemble', '')}, drift "
                     f"{d.get('energy_drift_meV_per_atom_ps', float('nan')):+.4f} meV/atom/ps, T "
                     + ", ".join(f"{s} {t['mean']:.1f}±{t['stderr']:.1f} K" for s, t in d["temperature_species_K"].items())
                     + (f", |T_H - T_O|/T {eq:.3f}" if eq is not None else "")
                     + (f", iterations/step {d['iterations_per_step']['mean']:.2f}" if "iterations_per_step" in d else ""))
    st = c["stability"]
    lines.append(f"stability: {'failed at %.0f fs (%s: %s)' % (st['time_fs'], st['criterion'], st['cause']) if st['failed'] else 'no failure'}"
                 f" over {st['duration_fs']:.0f} fs")
    return "\n".join(lines)
