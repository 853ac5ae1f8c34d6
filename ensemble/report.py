"""Reference vs model: a scorecard (JSON + Markdown) and the paper's figures (PNG).

:func:`compare` turns two statistics Datasets (:func:`ensemble.analysis.analyze`) into rows
of *reference*, *model* and *model - reference*, each with a standard error from block
averages over time (per-window values for spectral peaks), plus distances between
distributions (Wasserstein-1 of bond lengths and angles, area between g(r), total variation
between spectra) and the stability of the model run. :func:`write_report` writes it all for
one reference and any number of models, atomically, with figures mirroring the paper's
Figs. 1 and 3-7 (and g(r), VDOS, distributions).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import xarray as xr

from . import __version__
from .analysis import (STATS_SCHEMA, analyze, block_average, open_stats, peak_position, rdf_area,
                       spectral_peak, time_to_failure)

__all__ = ["load_stats", "compare", "format_scorecard", "write_report", "wasserstein1", "spectrum_distance",
           "ReportError", "H_STRETCH_BAND", "H_BEND_BAND"]

H_STRETCH_BAND = (2500.0, 4500.0)   #: cm^-1, O-H stretch in the H VDOS
H_BEND_BAND = (1000.0, 2500.0)      #: cm^-1, H-O-H bend in the H VDOS


class ReportError(ValueError):
    """Inputs that cannot be compared (missing store, different species, ...)."""


def load_stats(path: str | Path, **analyze_kwargs) -> xr.Dataset:
    """Statistics of a store: read a statistics store, or analyse a trajectory store (in memory)."""
    from .io.store import SCHEMA, open_trajectory
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path}: no such store")
    try:
        schema = xr.open_zarr(path, consolidated=False, zarr_format=3).attrs.get("schema")
    except Exception as exc:  # zarr raises many types for a non-store
        raise ReportError(f"{path}: not a readable zarr v3 store ({exc})") from exc
    if schema == STATS_SCHEMA:
        return open_stats(path)
    if schema == SCHEMA:
        return analyze(open_trajectory(path), source=str(path), **analyze_kwargs).compute()
    raise ReportError(f"{path}: attrs['schema'] is {schema!r}; expected a trajectory ({SCHEMA}) "
                      f"or statistics ({STATS_SCHEMA}) store")


# --------------------------------------------------------------------------- distances


def wasserstein1(a, b, n_quantiles: int = 2000) -> float:
    """Wasserstein-1 (earth mover's) distance between two samples: the mean absolute difference
    of their quantile functions, in the samples' units."""
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    u = (np.arange(n_quantiles) + 0.5) / n_quantiles
    return float(np.abs(np.quantile(a, u) - np.quantile(b, u)).mean())


def spectrum_distance(p: xr.DataArray, q: xr.DataArray) -> float:
    """Total variation distance (0 = same shape, 1 = disjoint) between two spectra over
    ``wavenumber``, each normalized to unit area; q is interpolated onto p's grid."""
    q = q.interp(wavenumber=p["wavenumber"]).fillna(0.0)
    p = p / p.integrate("wavenumber")
    q = q / q.integrate("wavenumber")
    return float(0.5 * np.abs(p - q).integrate("wavenumber"))


# --------------------------------------------------------------------------- scorecard


def _row(name, units, ref, model, note=""):
    (rm, re), (mm, me) = ref, model
    diff_err = math.hypot(re, me) if np.isfinite(re) and np.isfinite(me) else float("nan")
    diff = mm - rm
    z = diff / diff_err if np.isfinite(diff_err) and diff_err > 0 else float("nan")
    return {"quantity": name, "units": units, "reference": rm, "reference_err": re, "model": mm, "model_err": me,
            "difference": diff, "difference_err": diff_err, "z": z, "note": note}


def _series_rows(stats: xr.Dataset, n_blocks: int) -> dict[str, tuple[str, tuple[float, float]]]:
    """Time-averaged quantities of one run with block-average errors: name -> (units, (mean, err))."""
    rows = {"temperature": ("K", block_average(stats["temperature"].values, n_blocks))}
    for s in stats["species"].values:
        rows[f"temperature {s}"] = ("K", block_average(stats["species_temperature"].sel(species=s).values, n_blocks))
    for name, units in (("oh_bond_mean", "angstrom"), ("oh_bond_std", "angstrom"), ("hoh_angle_mean", "deg"),
                        ("hoh_angle_std", "deg")):
        rows[name.replace("_", " ")] = (units, block_average(stats[name].values, n_blocks))
    if "oh_spectrum_peak" in stats:
        peaks = stats["oh_spectrum_peak"].values
        rows["O-H stretch peak (bond spectrum)"] = ("cm^-1", block_average(peaks, peaks.size))
        for label, band in (("H stretch peak (VDOS)", H_STRETCH_BAND), ("H bend peak (VDOS)", H_BEND_BAND)):
            if "H" in stats["vdos"]["species"].values:
                p = spectral_peak(stats["vdos"].sel(species="H"), band).values
                rows[label] = ("cm^-1", block_average(p, p.size))
    # g(r) first-peak positions: from g(r) averaged in time blocks
    g = stats["rdf"]
    nb = max(1, min(n_blocks, g.sizes["frame"]))
    blocks = np.array_split(np.arange(g.sizes["frame"]), nb)
    for pair in g["pair"].values:
        gp = g.sel(pair=pair)
        if np.isnan(gp.values).all():
            continue
        pos = [float(peak_position(gp.isel(frame=b).mean("frame"), "r")) for b in blocks]
        rows[f"g(r) {pair} peak position"] = ("angstrom", block_average(pos, nb))
    return rows


def compare(reference: xr.Dataset, model: xr.Dataset, *, n_blocks: int = 8) -> dict:
    """Scorecard of ``model`` against ``reference`` (two statistics Datasets), as a plain dict.

    ``rows``: per quantity reference / model / difference with standard errors (block averages
    over ``n_blocks`` time blocks; for spectral peaks the spread over spectrum windows) and
    z = difference / its error. ``distances``: Wasserstein-1 of O-H bond lengths (Å) and H-O-H
    angles (deg), g(r) areas per pair (Å, 0-6 Å), total variation between spectra.
    ``stability``: :func:`ensemble.analysis.time_to_failure` of the model run.
    """
    if sorted(map(str, reference["species"].values)) != sorted(map(str, model["species"].values)):
        raise ReportError(f"species differ: reference {list(reference['species'].values)}, "
                          f"model {list(model['species'].values)}")
    ref_rows, mod_rows = _series_rows(reference, n_blocks), _series_rows(model, n_blocks)
    rows, missing = [], []
    for name, (units, ref) in ref_rows.items():
        if name in mod_rows:
            rows.append(_row(name, units, ref, mod_rows[name][1]))
        else:
            missing.append(name)
    distances = {
        "oh_bond_wasserstein1_angstrom": wasserstein1(reference["oh_bond"].values, model["oh_bond"].values),
        "hoh_angle_wasserstein1_deg": wasserstein1(reference["hoh_angle"].values, model["hoh_angle"].values),
    }
    area = rdf_area(model["rdf"].mean("frame"), reference["rdf"].mean("frame"))
    for pair in area["pair"].values:
        if np.isfinite(float(area.sel(pair=pair))):
            distances[f"rdf_area_{pair}_angstrom"] = float(area.sel(pair=pair))
    if "oh_spectrum" in reference and "oh_spectrum" in model:
        distances["oh_spectrum_total_variation"] = spectrum_distance(model["oh_spectrum"].mean("window"),
                                                                     reference["oh_spectrum"].mean("window"))
        for s in model["vdos"]["species"].values:
            distances[f"vdos_{s}_total_variation"] = spectrum_distance(model["vdos"].sel(species=s).mean("window"),
                                                                       reference["vdos"].sel(species=s).mean("window"))
    return {"rows": rows, "not_compared": missing +
            ([] if "oh_spectrum" in model else [f"spectra: {model.attrs.get('spectra', 'absent')}"]),
            "distances": distances, "stability": time_to_failure(model, reference),
            "reference_stability": time_to_failure(reference),
            "reference_source": reference.attrs.get("source", ""), "model_source": model.attrs.get("source", ""),
            "n_blocks": n_blocks}


def _pm(value, err, digits):
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f} ± {err:.{digits}f}" if np.isfinite(err) else f"{value:.{digits}f}"


_DIGITS = {"K": 1, "angstrom": 4, "deg": 2, "cm^-1": 0}


def format_scorecard(cards: dict[str, dict]) -> str:
    """Markdown: one table per model (reference, model, difference ± error, z), distances, stability."""
    lines = ["# Scorecard: model vs reference", "",
             "Errors are standard errors from block averages over time (spectral peaks: over spectrum "
             "windows); z = difference / its error, |z| > 3 marks a significant difference.", ""]
    for name, card in cards.items():
        st = card["stability"]
        lines += [f"## {name}", "", f"model: `{card['model_source']}`  ", f"reference: `{card['reference_source']}`",
                  "", "| quantity | units | reference | model | model − reference | z |", "|---|---|---|---|---|---|"]
        for r in card["rows"]:
            d = _DIGITS.get(r["units"], 3)
            z = f"{r['z']:+.1f}" if np.isfinite(r["z"]) else "n/a"
            flag = " **!**" if np.isfinite(r["z"]) and abs(r["z"]) > 3 else ""
            lines.append(f"| {r['quantity']} | {r['units']} | {_pm(r['reference'], r['reference_err'], d)} | "
                         f"{_pm(r['model'], r['model_err'], d)} | {_pm(r['difference'], r['difference_err'], d)} | "
                         f"{z}{flag} |")
        lines += ["", "| distance | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in card["distances"].items()]
        verdict = (f"failed at {st['time_fs']:.1f} fs ({st['criterion']})" if st["failed"]
                   else f"no failure in {st['duration_fs']:.1f} fs")
        lines += ["", f"Stability (first O-H > 2 Å, or g(r) area > 3 in a 1 ps window): {verdict}."]
        if card["not_compared"]:
            lines += ["", "Not compared: " + "; ".join(card["not_compared"]) + "."]
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures


def _ps(stats):
    t = np.asarray(stats["time"].values, float)
    return (t - t[0]) / 1000.0


def _figures(ref: xr.Dataset, models: dict[str, xr.Dataset], out: Path, seed: int = 0) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"][1:]
    runs = [("reference", ref, "k")] + [(n, s, colors[i % len(colors)]) for i, n_s in enumerate(models.items())
                                          for n, s in [n_s]]
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    # Fig. 1: the reference's kinetic energy and per-species temperature
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(_ps(ref), ref["kinetic_energy"], "k", lw=0.8)
    ax[0].set(xlabel="time (ps)", ylabel="kinetic energy (eV)", title="reference kinetic energy")
    for s in ref["species"].values:
        ax[1].plot(_ps(ref), ref["species_temperature"].sel(species=s), lw=0.8, label=f"{s}")
    ax[1].plot(_ps(ref), ref["temperature"], "k", lw=1.0, label="all")
    ax[1].set(xlabel="time (ps)", ylabel="temperature (K)", title="reference temperature per species")
    ax[1].legend()
    save(fig, "fig1_reference_kinetic_energy.png")

    # Fig. 3: temperature, reference vs models
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, s, c in runs:
        ax[0].plot(_ps(s), s["temperature"], color=c, lw=0.8, label=name)
        for sp, ls in zip(s["species"].values, ("-", "--", ":")):
            ax[1].plot(_ps(s), s["species_temperature"].sel(species=sp), color=c, ls=ls, lw=0.8, label=f"{name} {sp}")
    ax[0].set(xlabel="time (ps)", ylabel="temperature (K)", title="temperature")
    ax[1].set(xlabel="time (ps)", ylabel="temperature (K)", title="temperature per species")
    ax[0].legend(fontsize=8)
    ax[1].legend(fontsize=7)
    save(fig, "fig3_temperature.png")

    # Figs. 4 and 7: mean and standard deviation over time
    for fname, var, units, title in (("fig4_oh_bond.png", "oh_bond", "Å", "O-H bond"),
                                     ("fig7_hoh_angle.png", "hoh_angle", "deg", "H-O-H angle")):
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        for name, s, c in runs:
            ax[0].plot(_ps(s), s[f"{var}_mean"], color=c, lw=0.8, label=name)
            ax[1].plot(_ps(s), s[f"{var}_std"], color=c, lw=0.8, label=name)
        ax[0].set(xlabel="time (ps)", ylabel=f"mean ({units})", title=f"{title}: mean")
        ax[1].set(xlabel="time (ps)", ylabel=f"standard deviation ({units})", title=f"{title}: standard deviation")
        ax[0].legend(fontsize=8)
        save(fig, fname)

    # Fig. 5: four random hydrogens, reference dashed, models solid
    bonds = np.sort(np.random.default_rng(seed).choice(ref.sizes["bond"], size=4, replace=False))
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
    for ax, b in zip(axes.ravel(), bonds):
        for name, s, c in runs:
            if b < s.sizes["bond"]:
                ax.plot(_ps(s), s["oh_bond"].isel(bond=int(b)), color=c, lw=0.8, ls="--" if name == "reference" else "-",
                        label=name)
        ax.set(ylabel="O-H distance (Å)", title=f"H atom {int(ref['bond_hydrogen'].values[b])}")
    for ax in axes[1]:
        ax.set_xlabel("time (ps)")
        ax.set_xlim(0, max(float(_ps(ref)[-1]), 0.1))         # the reference's span: oscillations stay visible
    axes[0, 0].legend(fontsize=8)
    save(fig, "fig5_oh_bond_samples.png")

    # Fig. 6: O-H bond power spectrum and its peak per window
    with_spec = [(n, s, c) for n, s, c in runs if "oh_spectrum" in s]
    if with_spec:
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        for name, s, c in with_spec:
            ax[0].plot(s["wavenumber"], s["oh_spectrum"].mean("window"), color=c, lw=1.0, label=name)
            t0 = float(s["time"].values[0])
            ax[1].plot((s["window_time"] - t0) / 1000.0, s["oh_spectrum_peak"], "o-", color=c, ms=3, label=name)
        ax[0].set(xlabel="wavenumber (cm$^{-1}$)", ylabel="PSD (Å$^2$ cm)", title="O-H bond power spectrum",
                  xlim=(0, 5000), yscale="log")
        ax[1].set(xlabel="time (ps)", ylabel="peak (cm$^{-1}$)", title="O-H stretch peak per window")
        ax[0].legend(fontsize=8)
        save(fig, "fig6_oh_spectrum.png")

        fig, axes = plt.subplots(1, ref.sizes["species"], figsize=(5 * ref.sizes["species"], 3.6), squeeze=False)
        for ax, sp in zip(axes[0], ref["species"].values):
            for name, s, c in with_spec:
                ax.plot(s["wavenumber"], s["vdos"].sel(species=sp).mean("window"), color=c, lw=1.0, label=name)
            ax.set(xlabel="wavenumber (cm$^{-1}$)", ylabel="VDOS (per cm$^{-1}$, ∫ = 3)", title=f"VDOS {sp}",
                   xlim=(0, 5000))
        axes[0, 0].legend(fontsize=8)
        save(fig, "vdos.png")

    # radial distribution functions
    pairs = ref["pair"].values
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 3.6), squeeze=False)
    for ax, p in zip(axes[0], pairs):
        for name, s, c in runs:
            ax.plot(s["r"], s["rdf"].sel(pair=p).mean("frame"), color=c, lw=1.0, label=name)
        ax.set(xlabel="r (Å)", ylabel="g(r)", title=f"g(r) {p}")
    axes[0, 0].legend(fontsize=8)
    save(fig, "rdf.png")

    # distributions of bond lengths and angles
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, s, c in runs:
        ax[0].hist(s["oh_bond"].values.ravel(), bins=np.linspace(0.8, 1.3, 101), density=True, histtype="step",
                   color=c, label=name)
        ax[1].hist(s["hoh_angle"].values.ravel(), bins=np.linspace(80, 130, 101), density=True, histtype="step",
                   color=c, label=name)
    ax[0].set(xlabel="O-H distance (Å)", ylabel="probability density (1/Å)", title="O-H bond lengths")
    ax[1].set(xlabel="H-O-H angle (deg)", ylabel="probability density (1/deg)", title="H-O-H angles")
    ax[0].legend(fontsize=8)
    save(fig, "distributions.png")
    return written


def _labels(paths: list[Path]) -> list[str]:
    labels = []
    for p in paths:
        base = Path(p).name.removesuffix(".zarr") or str(p)
        label, k = base, 2
        while label in labels:
            label, k = f"{base}-{k}", k + 1
        labels.append(label)
    return labels


def write_report(reference: str | Path, models: list[str | Path], out: str | Path, *, overwrite: bool = False,
                 n_blocks: int = 8, window_fs: float = 100.0) -> dict:
    """Analyse (or read) the stores, compare each model with the reference, and write
    ``scorecard.json``, ``scorecard.md`` and the PNG figures into ``out`` (atomically).
    Returns the scorecards by model label."""
    from .io.store import atomic_output
    if not models:
        raise ReportError("give at least one model store to compare with the reference")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ReportError(f"{out} already exists; choose another --out or pass --overwrite")
    ref = load_stats(reference, window_fs=window_fs)
    stats = {label: load_stats(p, window_fs=window_fs) for label, p in zip(_labels(models), models)}
    cards = {label: compare(ref, s, n_blocks=n_blocks) for label, s in stats.items()}
    with atomic_output(out, overwrite=overwrite) as tmp:
        tmp.mkdir()
        figures = _figures(ref, stats, tmp)
        doc = {"schema": "ensemble.scorecard/1", "created_by": f"ensemble {__version__} report",
               "reference": str(reference), "models": cards, "figures": figures}
        (tmp / "scorecard.json").write_text(json.dumps(_finite(doc), indent=1, default=_json_default, allow_nan=False) + "\n")
        (tmp / "scorecard.md").write_text(format_scorecard(cards) + "\n\nFigures: " +
                                          ", ".join(f"[{f}]({f})" for f in figures) + "\n")
    return cards


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"cannot write {type(x).__name__} to JSON")


def _finite(x):
    """JSON has no NaN: non-finite numbers become null."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    return x
