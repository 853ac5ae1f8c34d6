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
from .analysis import STATS_SCHEMA, analyze, open_stats, rdf_area, run_scalars, time_to_failure
from .errors import UserError

__all__ = ["load_stats", "compare", "format_scorecard", "write_report", "wasserstein1", "spectrum_distance",
           "ReportError", "ensemble_table", "format_ensemble_table", "write_ensemble_report"]

class ReportError(UserError, ValueError):
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
    ref_rows, mod_rows = run_scalars(reference, n_blocks), run_scalars(model, n_blocks)
    rows, missing = [], []
    for key, (label, units, ref) in ref_rows.items():
        if key in mod_rows:
            rows.append(_row(label, units, ref, mod_rows[key][2]))
            rows[-1]["key"] = key
        else:
            missing.append(label)
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
        base = Path(p).name.removesuffix(".zarr").removesuffix(".stats") or str(p)
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


# --------------------------------------------------------------------------- ensembles


#: figures of the ensemble table: key -> column header
ENSEMBLE_COLUMNS = {"temperature": "T (K)", "temperature_H": "T H (K)", "temperature_O": "T O (K)",
                    "oh_bond_mean": "O-H (Å)", "oh_bond_std": "O-H std (Å)", "hoh_angle_mean": "H-O-H (deg)",
                    "hoh_angle_std": "H-O-H std (deg)", "oh_stretch_peak": "stretch (cm^-1)",
                    "rdf_peak_O-O": "g_OO peak (Å)"}


def _groups(agg: xr.Dataset) -> list[tuple[tuple, np.ndarray]]:
    keys = list(zip(agg["model"].values, agg["temperature_K"].values.tolist(), agg["tile"].values.tolist()))
    order = list(dict.fromkeys(keys))
    return [(k, np.array([i for i, kk in enumerate(keys) if kk == k])) for k in order]


def ensemble_table(agg: xr.Dataset) -> list[dict]:
    """Mean ± standard error across members, per (model, temperature, tile) group.

    The error is the spread between independent members (std / sqrt(n)), NaN for one member;
    failures: members that stopped or met a failure criterion, with their mean time to failure.
    """
    rows = []
    for (model, temp, tile), idx in _groups(agg):
        sub = agg.isel(member=idx)
        ttf = sub["time_to_failure"].values
        row = {"model": str(model), "temperature_K": float(temp), "tile": int(tile), "members": int(idx.size),
               "failed": int(np.isfinite(ttf).sum()),
               "time_to_failure_fs": float(np.nanmean(ttf)) if np.isfinite(ttf).any() else None,
               "duration_fs": float(sub["duration"].mean())}
        for key in ENSEMBLE_COLUMNS:
            if key not in sub:
                continue
            v = sub[key].values.astype(float)
            v = v[np.isfinite(v)]
            row[key] = float(v.mean()) if v.size else None
            row[f"{key}_err"] = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else None
        rows.append(row)
    return rows


def format_ensemble_table(rows: list[dict], reference: dict | None = None) -> str:
    """Markdown table of :func:`ensemble_table` rows, with the reference's figures first."""
    keys = [k for k in ENSEMBLE_COLUMNS if any(k in r for r in rows)]
    head = "| model | T target (K) | tile | members (failed) | " + " | ".join(ENSEMBLE_COLUMNS[k] for k in keys) + \
        " | first failure (fs) |"
    lines = [head, "|" + "---|" * (5 + len(keys))]
    if reference is not None:
        cells = [_pm(*reference[k][2], _DIGITS.get(reference[k][1], 3)) if k in reference else "n/a" for k in keys]
        lines.append("| reference | | | | " + " | ".join(cells) + " | |")
    for r in rows:
        cells = []
        for k in keys:
            units = "K" if k.startswith("temperature") else "cm^-1" if k.endswith("peak") else \
                "deg" if "angle" in k else "angstrom"
            v, e = r.get(k), r.get(f"{k}_err")
            cells.append(_pm(v, float("nan") if e is None else e, _DIGITS[units]) if v is not None else "n/a")
        ttf = "—" if r["time_to_failure_fs"] is None else f"{r['time_to_failure_fs']:.0f}"
        lines.append(f"| {r['model']} | {r['temperature_K']:g} | {r['tile']} | {r['members']} ({r['failed']}) | "
                     + " | ".join(cells) + f" | {ttf} |")
    return "\n".join(lines)


def _ensemble_figures(agg: xr.Dataset, ref: xr.Dataset | None, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    groups = _groups(agg)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(8, 4))
    for g, ((model, temp, tile), idx) in enumerate(groups):
        for j, i in enumerate(idx):
            s = agg["temperature_series"].isel(member=int(i))
            ax.plot(agg["run_time"] / 1000, s, color=colors[g % len(colors)], lw=0.7,
                    label=f"{model} {temp:g} K x{tile}" if j == 0 else None)
    if ref is not None:
        t = np.asarray(ref["time"].values, float)
        ax.plot((t - t[0]) / 1000, ref["temperature"], "k", lw=1.0, label="reference")
    ax.set(xlabel="time since start (ps)", ylabel="temperature (K)", title="temperature of every member")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ensemble_temperature.png", dpi=110)
    plt.close(fig)
    written.append("ensemble_temperature.png")

    keys = [k for k in ("temperature_H", "temperature_O", "oh_bond_mean", "hoh_angle_mean", "oh_stretch_peak",
                        "rdf_peak_O-O") if k in agg]
    ref_vals = run_scalars(ref) if ref is not None else {}
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    lines = {}
    for (model, temp, tile), idx in groups:
        lines.setdefault((model, tile), []).append((temp, idx))
    for ax, key in zip(axes.ravel(), keys):
        for c, ((model, tile), pts) in enumerate(lines.items()):
            xs = [t for t, _ in pts]
            vals = [agg[key].values[idx].astype(float) for _, idx in pts]
            ys = [np.nanmean(v) if np.isfinite(v).any() else np.nan for v in vals]
            es = [np.nanstd(v, ddof=1) / np.sqrt(np.isfinite(v).sum()) if np.isfinite(v).sum() > 1 else 0.0
                  for v in vals]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=colors[c % len(colors)],
                        label=f"{model} x{tile}")
        if key in ref_vals:
            label, units, (m, e) = ref_vals[key]
            ax.axhline(m, color="k", ls="--", lw=1.0, label="reference")
            if np.isfinite(e):
                ax.axhspan(m - e, m + e, color="k", alpha=0.1)
        label, units = (ref_vals[key][0], ref_vals[key][1]) if key in ref_vals else (key, "")
        ax.set(xlabel="thermostat target (K)", ylabel=f"{label} ({units})", title=label)
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ensemble_figures.png", dpi=110)
    plt.close(fig)
    written.append("ensemble_figures.png")

    pairs = agg["pair"].values
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 3.6), squeeze=False)
    for ax, p in zip(axes[0], pairs):
        for g, ((model, temp, tile), idx) in enumerate(groups):
            ax.plot(agg["r"], agg["rdf_mean"].sel(pair=p).isel(member=idx).mean("member"),
                    color=colors[g % len(colors)], lw=1.0, label=f"{model} {temp:g} K x{tile}")
        if ref is not None:
            ax.plot(ref["r"], ref["rdf"].sel(pair=p).mean("frame"), "k--", lw=1.0, label="reference")
        ax.set(xlabel="r (Å)", ylabel="g(r)", title=f"g(r) {p}, mean over members")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ensemble_rdf.png", dpi=110)
    plt.close(fig)
    written.append("ensemble_rdf.png")
    return written


def write_ensemble_report(agg: xr.Dataset, reference: xr.Dataset | None, out: str | Path, *,
                          summaries: list[dict] | None = None, title: str = "ensemble") -> dict:
    """Write ``aggregate.zarr``, ``summary.json``, ``summary.md`` and ``figures/`` into ``out``
    (each atomically: a temporary path, then rename). Returns the summary document."""
    from .io.store import atomic_output, atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = ensemble_table(agg)
    ref = run_scalars(reference) if reference is not None else None
    with atomic_output(out / "aggregate.zarr", overwrite=True) as tmp:
        agg.to_zarr(tmp, mode="w", consolidated=False, zarr_format=3)
    with atomic_output(out / "figures", overwrite=True) as tmp:
        tmp.mkdir()
        figures = _ensemble_figures(agg, reference, tmp)
    failures = [s for s in (summaries or []) if s.get("status") != "complete"]
    doc = {"schema": "ensemble.summary/1", "title": title, "created_by": f"ensemble {__version__}",
           "groups": rows, "reference": {k: {"label": v[0], "units": v[1], "mean": v[2][0], "err": v[2][1]}
                                          for k, v in (ref or {}).items()},
           "members": [{k: s.get(k) for k in ("id", "status", "error", "seconds", "simulate_s", "analyze_s",
                                               "atom_steps_per_s", "skipped", "warnings")} for s in (summaries or [])],
           "figures": [f"figures/{f}" for f in figures]}
    md = [f"# {title}", "", "Mean ± standard error across members (independent seeds) per model, thermostat "
          "target and tiling; the reference row has block-average errors over time. A member fails at its first "
          "O-H bond beyond 2 Å, the first 1 ps window whose g(r) departs from the reference by an area above 3, "
          "or where its run stopped.", "", format_ensemble_table(rows, ref), ""]
    if failures:
        md += ["Failed members:", ""] + [f"- `{s['id']}`: {s['status']}: {s.get('error')}" for s in failures] + [""]
    md += ["Figures: " + ", ".join(f"[{f}](figures/{f})" for f in figures), ""]
    atomic_write_text(out / "summary.json",
                      json.dumps(_finite(doc), indent=1, default=_json_default, allow_nan=False) + "\n")
    atomic_write_text(out / "summary.md", "\n".join(md) + "\n")
    return doc
