"""Reference vs model: a scorecard (JSON + Markdown) and the paper's figures (PNG).

:func:`compare` turns two statistics Datasets (:func:`ensemble.analysis.analyze`) into rows
of *reference*, *model* and *model - reference*, each with a standard error from block
averages over time (per-window values for spectral peaks, Poisson for proton-transfer
rates), plus distances between distributions (Wasserstein-1 of bond lengths and angles, area
between g(r), total variation between spectra) and the stability of the model run (three
named criteria). :func:`write_report` writes it all for one reference and any number of
models, atomically, with figures mirroring the paper's Figs. 1 and 3-7 (and g(r), VDOS,
distributions, ions). Inputs may carry frame ranges: ``STORE:START:STOP``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import xarray as xr

from . import __version__
from .analysis import (CRITERIA, STATS_SCHEMA, analyze, open_stats, rdf_area, run_scalars,
                       select_frames, split_frame_range, stability)
from .errors import UserError

__all__ = ["load_stats", "compare", "format_scorecard", "write_report", "wasserstein1", "spectrum_distance",
           "ReportError", "ensemble_table", "format_ensemble_table", "write_ensemble_report", "report_ensemble"]


class ReportError(UserError, ValueError):
    """Inputs that cannot be compared (missing store, different species, ...)."""


def load_stats(spec: str | Path, **analyze_kwargs) -> xr.Dataset:
    """Statistics of ``STORE[:START:STOP[:STRIDE]]``: read a statistics store (and select the
    frame range), or analyse that range of a trajectory store (in memory)."""
    from .io.store import SCHEMA, open_trajectory, open_zarr
    path, frames = split_frame_range(str(spec))
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path}: no such store")
    try:
        schema = open_zarr(path).attrs.get("schema")
    except Exception as exc:  # zarr raises many types for a non-store
        raise ReportError(f"{path}: not a readable zarr v3 store ({type(exc).__name__}: {exc})") from None
    label = f"{path}" + (f" frames {frames.start or 0}:{'' if frames.stop is None else frames.stop}" if frames else "")
    if schema == STATS_SCHEMA or str(schema).startswith("ensemble.stats/"):
        stats = open_stats(path)
        return select_frames(stats, frames).assign_attrs(source=label) if frames else stats
    if schema == SCHEMA:
        ds = open_trajectory(path)
        if frames is not None:
            n = ds.sizes["frame"]
            if len(range(n)[frames]) < 2:
                raise ReportError(f"{spec}: selects {len(range(n)[frames])} of the {n} frames of {path}; "
                                  "need at least 2")
            ds = ds.isel(frame=frames)
        return analyze(ds, source=label, **analyze_kwargs).compute()
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


#: fewer frames than this per block make block errors meaningless: a run shorter than
#: n_blocks x this is not compared by significance (z is left out)
MIN_FRAMES_PER_BLOCK = 4


def compare(reference: xr.Dataset, model: xr.Dataset, *, n_blocks: int = 8) -> dict:
    """Scorecard of ``model`` against ``reference`` (two statistics Datasets), as a plain dict.

    ``rows``: per quantity reference / model / difference with standard errors (block averages
    over ``n_blocks`` time blocks; for spectral peaks the spread over spectrum windows, with the
    spectral resolution in ``note``; Poisson for the proton-transfer rate) and z = difference /
    its error. ``distances``: Wasserstein-1 of O-H bonds (Å) and H-O-H angles (deg), g(r) areas
    per pair (Å, 0-6 Å), total variation between spectra. ``stability``: the three criteria of
    :func:`ensemble.analysis.stability` for the model (structure against the reference) and
    the reference (blow-up and dissociation).
    """
    if sorted(map(str, reference["species"].values)) != sorted(map(str, model["species"].values)):
        raise ReportError(f"species differ: reference {list(reference['species'].values)}, "
                          f"model {list(model['species'].values)}")
    short = [name for name, s in (("reference", reference), ("model", model))
             if s.sizes["frame"] < MIN_FRAMES_PER_BLOCK * n_blocks]
    ref_rows, mod_rows = run_scalars(reference, n_blocks), run_scalars(model, n_blocks)
    rows, missing = [], []
    for key, ref in ref_rows.items():
        if key in mod_rows:
            note = "; ".join(dict.fromkeys(n for n in (ref.note, mod_rows[key].note) if n))
            rows.append(_row(ref.label, ref.units, ref.value, mod_rows[key].value, note))
            rows[-1]["key"] = key
            if short and key != "proton_transfer_rate":
                rows[-1]["z"] = float("nan")
        else:
            missing.append(ref.label)
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
    not_compared = missing + ([] if "oh_spectrum" in model else [f"spectra: {model.attrs.get('spectra', 'absent')}"])
    if short:
        not_compared.append(f"significance (z): the {' and '.join(short)} run has fewer than "
                            f"{MIN_FRAMES_PER_BLOCK * n_blocks} frames ({MIN_FRAMES_PER_BLOCK} per block)")
    return {"rows": rows, "not_compared": not_compared, "distances": distances,
            "stability": stability(model, reference), "reference_stability": stability(reference),
            "reference_source": reference.attrs.get("source", ""), "model_source": model.attrs.get("source", ""),
            "n_blocks": n_blocks}


def _pm(value, err, digits):
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f} ± {err:.{digits}f}" if err is not None and np.isfinite(err) else f"{value:.{digits}f}"


_DIGITS = {"K": 1, "angstrom": 4, "deg": 2, "cm^-1": 0, "1": 2, "1/ps": 3, "fs": 0}
_UNIT_LABEL = {"angstrom": "Å", "deg": "deg", "cm^-1": "cm^-1", "K": "K", "1": "", "1/ps": "1/ps", "fs": "fs"}


def format_stability(st: dict) -> str:
    """One line per criterion: fired at what time and why, or not."""
    lines = []
    for name in CRITERIA:
        c = st["criteria"][name]
        label = name.replace("_", "-")
        if c["failed"]:
            lines.append(f"- {label}: **failed** at {c['time_fs']:.1f} fs: {c['cause']}")
        elif c["cause"]:
            lines.append(f"- {label}: {c['cause']}")
        else:
            lines.append(f"- {label}: no failure in {st['duration_fs']:.1f} fs")
    return "\n".join(lines)


def format_scorecard(cards: dict[str, dict]) -> str:
    """Markdown: one table per model (reference, model, difference ± error, z, note), distances, stability."""
    lines = ["# Scorecard: model vs reference", "",
             "Errors are standard errors from block averages over time (spectral peaks: over spectrum "
             "windows, with the spectral resolution in the note; proton-transfer rates: Poisson); z = difference / "
             "its error, |z| > 3 marks a significant difference.", ""]
    for name, card in cards.items():
        st = card["stability"]
        lines += [f"## {name}", "", f"model: `{card['model_source']}`  ", f"reference: `{card['reference_source']}`",
                  "", "| quantity | units | reference | model | model − reference | z | note |",
                  "|---|---|---|---|---|---|---|"]
        for r in card["rows"]:
            d = _DIGITS.get(r["units"], 3)
            z = f"{r['z']:+.1f}" if np.isfinite(r["z"]) else "n/a"
            flag = " **!**" if np.isfinite(r["z"]) and abs(r["z"]) > 3 else ""
            lines.append(f"| {r['quantity']} | {_UNIT_LABEL.get(r['units'], r['units'])} | "
                         f"{_pm(r['reference'], r['reference_err'], d)} | {_pm(r['model'], r['model_err'], d)} | "
                         f"{_pm(r['difference'], r['difference_err'], d)} | {z}{flag} | {r['note']} |")
        lines += ["", "| distance | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in card["distances"].items()]
        verdict = (f"**failed** at {st['time_fs']:.1f} fs ({st['criterion'].replace('_', '-')}: {st['cause']})"
                   if st["failed"] else f"no failure in {st['duration_fs']:.1f} fs")
        lines += ["", f"Stability of the model run: {verdict}. Criteria (proton transfer is a rate above, "
                      "never a failure):", "", format_stability(st)]
        ref_st = card["reference_stability"]
        if ref_st["failed"]:
            lines += ["", f"The reference itself fails {ref_st['criterion'].replace('_', '-')} at "
                          f"{ref_st['time_fs']:.1f} fs: {ref_st['cause']}."]
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

    # Fig. 5: four random hydrogens (distance to their current nearest O), reference dashed, models solid
    picks = np.sort(np.random.default_rng(seed).choice(ref.sizes["hydrogen"], size=min(4, ref.sizes["hydrogen"]),
                                                       replace=False))
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
    for ax, j in zip(axes.ravel(), picks):
        atom = int(ref["hydrogen"].values[j])
        for name, s, c in runs:
            if atom in s["hydrogen"].values:
                ax.plot(_ps(s), s["oh_bond"].sel(hydrogen=atom), color=c, lw=0.8,
                        ls="--" if name == "reference" else "-", label=name)
        ax.set(ylabel="O-H distance (Å)", title=f"H atom {atom} to its nearest O")
    for ax in axes[1]:
        ax.set_xlabel("time (ps)")
        ax.set_xlim(0, max(float(_ps(ref)[-1]), 0.1))         # the reference's span: oscillations stay visible
    axes[0, 0].legend(fontsize=8)
    save(fig, "fig5_oh_bond_samples.png")

    # ions over time: H3O+ and OH- per frame (proton transfer is chemistry, shown, not failed)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, s, c in runs:
        ax[0].plot(_ps(s), s["n_hydronium"], color=c, lw=0.8, label=name)
        ax[1].plot(_ps(s), s["n_hydroxide"], color=c, lw=0.8, label=name)
    ax[0].set(xlabel="time (ps)", ylabel="count", title="H3O+ per frame")
    ax[1].set(xlabel="time (ps)", ylabel="count", title="OH- per frame")
    ax[0].legend(fontsize=8)
    save(fig, "ions.png")

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
        angles = s["hoh_angle"].values.ravel()
        ax[1].hist(angles[np.isfinite(angles)], bins=np.linspace(80, 130, 101), density=True, histtype="step",
                   color=c, label=name)
    ax[0].set(xlabel="O-H distance (Å)", ylabel="probability density (1/Å)", title="O-H bond lengths")
    ax[1].set(xlabel="H-O-H angle (deg)", ylabel="probability density (1/deg)", title="H-O-H angles of H2O")
    ax[0].legend(fontsize=8)
    save(fig, "distributions.png")
    return written


def _labels(paths: list[Path]) -> list[str]:
    labels = []
    for p in paths:
        path, frames = split_frame_range(str(p))
        base = Path(path).name.removesuffix(".zarr").removesuffix(".stats") or str(path)
        if frames is not None:
            base += f"[{frames.start or 0}:{'' if frames.stop is None else frames.stop}]"
        label, k = base, 2
        while label in labels:
            label, k = f"{base}-{k}", k + 1
        labels.append(label)
    return labels


def write_report(reference: str | Path, models: list[str | Path], out: str | Path, *, overwrite: bool = False,
                 n_blocks: int = 8, window_fs: float = 100.0, pad: int = 4,
                 labels: list[str] | None = None) -> dict:
    """Analyse (or read) the stores (each ``STORE[:START:STOP]``), compare each model with the
    reference, and write ``scorecard.json``, ``scorecard.md`` and the PNG figures into ``out``
    (atomically). Returns the scorecards by model label: ``labels`` (one per store, distinct) or,
    by default, the store names."""
    from .io.store import atomic_output
    if not models:
        raise ReportError("give at least one model store to compare with the reference")
    if not (isinstance(n_blocks, int) and n_blocks >= 2):
        raise ReportError(f"--blocks must be an integer >= 2, got {n_blocks!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ReportError(f"{out} already exists; choose another --out or pass --overwrite")
    if labels is None:
        labels = _labels(models)
    elif len(labels) != len(models) or len(set(labels)) != len(labels) or "reference" in labels:
        raise ReportError(f"labels {labels!r}: expected {len(models)} distinct labels (one per model store), "
                          "none of them 'reference'")
    ref = load_stats(reference, window_fs=window_fs, pad=pad)
    stats = {label: load_stats(p, window_fs=window_fs, pad=pad) for label, p in zip(labels, models)}
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
                    "rdf_peak_O-O": "g_OO peak (Å)", "n_hydronium": "H3O+ per frame",
                    "proton_transfer_rate": "hops (1/molecule/ps)"}
#: how the ensemble table's errors are made (printed with the table)
ENSEMBLE_ERROR_NOTE = ("error: the larger of the spread across members (std / sqrt(n)) and the members' in-run "
                       "block-average errors pooled (sqrt(sum of squares) / n)")


def _groups(agg: xr.Dataset) -> list[tuple[tuple, np.ndarray]]:
    keys = list(zip(agg["model"].values, agg["temperature_K"].values.tolist(), agg["tile"].values.tolist()))
    order = list(dict.fromkeys(keys))
    return [(k, np.array([i for i, kk in enumerate(keys) if kk == k])) for k in order]


def group_error(values, errors) -> float | None:
    """Standard error of a group mean: the larger of the spread across members and the pooled
    in-run errors (two seeds that happen to agree must not read "± 0.00")."""
    v, e = np.asarray(values, float), np.asarray(errors, float)
    keep = np.isfinite(v)
    v, e = v[keep], e[keep]
    if v.size == 0:
        return None
    spread = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
    pooled = float(np.sqrt(np.sum(e[np.isfinite(e)] ** 2)) / v.size) if np.isfinite(e).any() else float("nan")
    best = np.nanmax([spread, pooled]) if np.isfinite([spread, pooled]).any() else float("nan")
    return float(best) if np.isfinite(best) else None


def ensemble_table(agg: xr.Dataset) -> list[dict]:
    """Mean ± standard error across members, per (model, temperature, tile) group.

    Errors: :func:`group_error`. Failures: how many members failed a stability criterion, the
    earliest failure time and the criteria that fired first.
    """
    rows = []
    for (model, temp, tile), idx in _groups(agg):
        sub = agg.isel(member=idx)
        ttf = sub["time_to_failure"].values.astype(float)
        crit = [str(c) for c, f in zip(sub["failed_criterion"].values, ttf) if np.isfinite(f)] \
            if "failed_criterion" in sub else []
        row = {"model": str(model), "temperature_K": float(temp), "tile": int(tile), "members": int(idx.size),
               "failed": int(np.isfinite(ttf).sum()),
               "first_failure_fs": float(np.nanmin(ttf)) if np.isfinite(ttf).any() else None,
               "failed_criteria": {c: crit.count(c) for c in dict.fromkeys(crit)},
               "duration_fs": float(sub["duration"].mean())}
        for key in ENSEMBLE_COLUMNS:
            if key not in sub:
                continue
            v = sub[key].values.astype(float)
            row[key] = float(np.nanmean(v)) if np.isfinite(v).any() else None
            row[f"{key}_err"] = group_error(v, sub[f"{key}_err"].values) if f"{key}_err" in sub else None
            row[f"{key}_units"] = str(sub[key].attrs.get("units", ""))
        rows.append(row)
    return rows


def _failure_cell(r: dict) -> str:
    if r["first_failure_fs"] is None:
        return "—"
    crits = ", ".join(f"{c.replace('_', '-')} x{n}" for c, n in r["failed_criteria"].items())
    return f"{r['first_failure_fs']:.0f} ({crits})"


def format_ensemble_table(rows: list[dict], reference: dict | None = None) -> str:
    """Markdown table of :func:`ensemble_table` rows, with the reference's figures first."""
    keys = [k for k in ENSEMBLE_COLUMNS if any(k in r for r in rows)]
    head = "| model | T target (K) | tile | members (failed) | " + " | ".join(ENSEMBLE_COLUMNS[k] for k in keys) + \
        " | first failure (fs, criterion x members) |"
    lines = [head, "|" + "---|" * (5 + len(keys))]
    if reference is not None:
        cells = [_pm(*reference[k].value, _DIGITS.get(reference[k].units, 3)) if k in reference else "n/a"
                 for k in keys]
        lines.append("| reference | | | | " + " | ".join(cells) + " | |")
    for r in rows:
        cells = []
        for k in keys:
            v, e = r.get(k), r.get(f"{k}_err")
            cells.append(_pm(v, e, _DIGITS.get(r.get(f"{k}_units"), 3)) if v is not None else "n/a")
        lines.append(f"| {r['model']} | {r['temperature_K']:g} | {r['tile']} | {r['members']} ({r['failed']}) | "
                     + " | ".join(cells) + f" | {_failure_cell(r)} |")
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
            label, units, (m, e), _ = ref_vals[key]
            ax.axhline(m, color="k", ls="--", lw=1.0, label="reference")
            if np.isfinite(e):
                ax.axhspan(m - e, m + e, color="k", alpha=0.1)
        label, units = (ref_vals[key].label, ref_vals[key].units) if key in ref_vals else (key, "")
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
    from .io.store import atomic_output, atomic_write_text, write_zarr

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = ensemble_table(agg)
    ref = run_scalars(reference) if reference is not None else None
    with atomic_output(out / "aggregate.zarr", overwrite=True) as tmp:
        write_zarr(agg, tmp, mode="w")
    with atomic_output(out / "figures", overwrite=True) as tmp:
        tmp.mkdir()
        figures = _ensemble_figures(agg, reference, tmp)
    failures = [s for s in (summaries or []) if s.get("status") != "complete"]
    doc = {"schema": "ensemble.summary/1", "title": title, "created_by": f"ensemble {__version__}",
           "groups": rows, "reference": {k: {"label": v.label, "units": v.units, "mean": v.value[0],
                                              "err": v.value[1], "note": v.note} for k, v in (ref or {}).items()},
           "members": [{k: s.get(k) for k in ("id", "status", "error", "seconds", "simulate_s", "analyze_s",
                                               "atom_steps_per_s", "skipped", "warnings")} for s in (summaries or [])],
           "figures": [f"figures/{f}" for f in figures]}
    md = [f"# {title}", "", f"Mean ± standard error across members (independent seeds) per model, thermostat "
          f"target and tiling ({ENSEMBLE_ERROR_NOTE}); the reference row has block-average errors over time. "
          "Stability criteria: blow-up (non-finite, runaway temperature, thermostat lost: 100 fs above 1.5x the target, run stopped), dissociation (a free H, an O "
          "with >= 4 H, or O-O collapse, sustained 20 fs), structure (g(r) area > 3 against the reference in a "
          "sliding 1 ps window). Proton transfer is a rate (hops), never a failure.", "",
          format_ensemble_table(rows, ref), ""]
    if failures:
        md += ["Failed members:", ""] + [f"- `{s['id']}`: {s['status']}: {s.get('error')}" for s in failures] + [""]
    md += ["Figures: " + ", ".join(f"[{f}](figures/{f})" for f in figures), ""]
    atomic_write_text(out / "summary.json",
                      json.dumps(_finite(doc), indent=1, default=_json_default, allow_nan=False) + "\n")
    atomic_write_text(out / "summary.md", "\n".join(md) + "\n")
    return doc


def report_ensemble(ens, out: str | Path, summaries: list[dict], *, n_blocks: int = 8) -> dict:
    """Aggregate an ensemble's members (:func:`ensemble.runner.aggregate`) and write
    ``aggregate.zarr``, ``summary.json``, ``summary.md`` and ``figures/`` into ``out``."""
    from .runner import aggregate

    agg, ref = aggregate(ens, out, summaries, n_blocks=n_blocks)
    return write_ensemble_report(agg, ref, out, summaries=summaries, title=f"Ensemble {ens.name}")
