"""Time-averaged figures of one run with honest errors.

Per-frame series: block averages over contiguous time blocks (errors account for time
correlation, Flyvbjerg & Petersen 1989), weighted by the molecules present where a series is a
mean over a varying set (angles of the water molecules of each frame). Spectral peaks: the
spread over spectrum windows, with the spectral resolution beside them. Counts of rare events
(proton transfers): Poisson errors.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import xarray as xr

from .geometry import angle_from_distances
from .rdf import first_peak
from .spectra import H_BEND_BAND, H_STRETCH_BAND, peak_position, spectral_peak
from .topology import ion_lifetimes, proton_transfers

__all__ = ["Scalar", "block_average", "run_scalars"]


class Scalar(NamedTuple):
    """One time-averaged figure: label, units, (mean, standard error) and a note (e.g. the resolution)."""

    label: str
    units: str
    value: tuple[float, float]
    note: str = ""


def block_average(series, n_blocks: int = 8, weights=None) -> tuple[float, float]:
    """Mean of a time series and its standard error from ``n_blocks`` contiguous block means.

    Blocks longer than the correlation time make the block means independent, so the error
    accounts for time correlation. With ``weights`` (e.g. molecules present per frame) the
    mean and the block means are weighted. NaN error with < 2 blocks.
    """
    x = np.asarray(series, dtype=float)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=float)
    keep = np.isfinite(x) & np.isfinite(w) & (w > 0)
    x, w = x[keep], w[keep]
    if x.size == 0:
        return float("nan"), float("nan")
    mean = float(np.sum(w * x) / np.sum(w))
    n_blocks = min(n_blocks, x.size)
    if n_blocks < 2:
        return mean, float("nan")
    size = x.size // n_blocks
    xb, wb = x[:size * n_blocks].reshape(n_blocks, size), w[:size * n_blocks].reshape(n_blocks, size)
    means = (xb * wb).sum(axis=1) / wb.sum(axis=1)
    return mean, float(means.std(ddof=1) / np.sqrt(n_blocks))


def _resolution_note(spec: xr.DataArray) -> str:
    return (f"resolution {spec.attrs['resolution_cm^-1']:.0f} cm^-1 ({spec.attrs['window_fs']:g} fs windows), "
            f"grid {spec.attrs['grid_cm^-1']:.0f} cm^-1")


def run_scalars(stats: xr.Dataset, n_blocks: int = 8) -> dict[str, Scalar]:
    """Time-averaged figures of one run: key -> :class:`Scalar`.

    Temperatures (overall, per species), O-H bond mean / std, H-O-H angle mean / std of water
    (weighted by the molecules present per frame), the same angle implied by the
    intramolecular H-H distance and by the first peaks of g_HH and g_OH (cross-checks), H3O+
    and OH- per frame, the hydronium angle, the proton-transfer rate per molecule per ps
    (Poisson error) and ion lifetimes, spectral peaks with their resolution, and the g(r)
    first-peak positions (from g(r) averaged per time block).
    """
    rows: dict[str, Scalar] = {}
    if "temperature" in stats:
        rows["temperature"] = Scalar("temperature", "K", block_average(stats["temperature"].values, n_blocks))
    if "species_temperature" in stats:
        for s in stats["species"].values:
            rows[f"temperature_{s}"] = Scalar(f"temperature {s}", "K",
                                              block_average(stats["species_temperature"].sel(species=s).values, n_blocks))
    n_water = stats["n_water"].values
    for name, label, units, weights in (("oh_bond_mean", "O-H bond mean", "angstrom", None),
                                        ("oh_bond_std", "O-H bond std", "angstrom", None),
                                        ("hoh_angle_mean", "H-O-H angle mean", "deg", n_water),
                                        ("hoh_angle_std", "H-O-H angle std", "deg", n_water),
                                        ("hh_intra_mean", "intramolecular H-H distance", "angstrom", n_water)):
        rows[name] = Scalar(label, units, block_average(stats[name].values, n_blocks, weights))
    for name, label in (("n_hydronium", "H3O+ per frame"), ("n_hydroxide", "OH- per frame"),
                        ("n_free_hydrogen", "free H per frame")):
        rows[name] = Scalar(label, "1", block_average(stats[name].values, n_blocks))
    if np.isfinite(stats["h3o_angle_mean"].values).any():
        rows["h3o_angle_mean"] = Scalar("H-O-H angle of H3O+", "deg",
                                        block_average(stats["h3o_angle_mean"].values, n_blocks,
                                                      stats["n_hydronium"].values))
    pt = proton_transfers(stats)
    rows["proton_transfer_rate"] = Scalar("proton transfers per molecule per ps", "1/ps",
                                          (pt.rate_per_molecule_ps, pt.rate_err),
                                          f"{pt.count} events in {pt.duration_ps:.3g} ps, dwell {pt.dwell_fs:g} fs; "
                                          "error: Poisson")
    life = ion_lifetimes(stats)
    for ion, label in (("hydronium", "H3O+ lifetime"), ("hydroxide", "OH- lifetime")):
        if life[ion]["complete"]:
            lengths_note = f"{life[ion]['complete']} complete episodes, {life[ion]['censored']} cut by the run's ends"
            rows[f"{ion}_lifetime"] = Scalar(label, "fs", (life[ion]["mean_fs"], float("nan")), lengths_note)
    if "oh_spectrum_peak" in stats and stats.sizes.get("window", 0) > 0:
        peaks = stats["oh_spectrum_peak"].values
        rows["oh_stretch_peak"] = Scalar("O-H stretch peak (bond spectrum)", "cm^-1",
                                         block_average(peaks, peaks.size), _resolution_note(stats["oh_spectrum"]))
        if "H" in stats["vdos"]["species"].values:
            for key, label, band in (("vdos_H_stretch_peak", "H stretch peak (VDOS)", H_STRETCH_BAND),
                                     ("vdos_H_bend_peak", "H bend peak (VDOS)", H_BEND_BAND)):
                p = spectral_peak(stats["vdos"].sel(species="H"), band).values
                rows[key] = Scalar(label, "cm^-1", block_average(p, p.size), _resolution_note(stats["vdos"]))
    g = stats["rdf"]
    nb = max(1, min(n_blocks, g.sizes["frame"]))
    blocks = np.array_split(np.arange(g.sizes["frame"]), nb)
    for pair in g["pair"].values:
        gp = g.sel(pair=pair)
        if np.isnan(gp.values).all():
            continue
        pos = [float(peak_position(gp.isel(frame=b).mean("frame"), "r")) for b in blocks]
        rows[f"rdf_peak_{pair}"] = Scalar(f"g(r) {pair} peak position", "angstrom", block_average(pos, nb))
    # cross-check of the angle: the intramolecular H-H distance (first g_HH peak) and the O-H bond
    if "H-H" in g["pair"].values and "O-H" in g["pair"].values:
        hh = [float(first_peak(g.sel(pair="H-H").isel(frame=b).mean("frame"), 1.2, 2.0)) for b in blocks]
        oh = [float(first_peak(g.sel(pair="O-H").isel(frame=b).mean("frame"), 0.8, 1.3)) for b in blocks]
        rows["rdf_first_peak_H-H"] = Scalar("g(r) H-H first peak (intramolecular H-H)", "angstrom",
                                            block_average(hh, nb))
        rows["hoh_angle_from_rdf"] = Scalar("H-O-H angle from the first g_HH and g_OH peaks", "deg",
                                            block_average(angle_from_distances(hh, oh), nb),
                                            "2 asin(r_HH / 2 r_OH); cross-check of the angle mean")
    return rows
