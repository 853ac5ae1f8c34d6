"""Radial distribution functions per species pair, per frame (a numba kernel over frame blocks).

g(r) = pair counts in a shell / the counts of an ideal gas of the same density; per frame, so
time windows of it (the structure-drift criterion) and merges along ``frame`` are exact.
:func:`rdf_area` is the area between two g(r) (Fu et al. 2023's structure measure);
:func:`first_peak` the position of the first maximum (e.g. the intramolecular H-H distance).
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from numba import njit

from ..invariants import pair_geometry
from .topology import AnalysisError, static_box

__all__ = ["species_pairs", "rdf_counts_kernel", "rdf", "rdf_area", "first_peak"]


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
    box = static_box(ds)
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
                 "bin_width_angstrom": float(bin_width)}
    return out.rename("rdf")


def rdf_area(g: xr.DataArray, g_ref: xr.DataArray, r_max: float = 6.0) -> xr.DataArray:
    """Area between two g(r) (pair, r) over 0 < r < r_max, Å, per pair (ref interpolated onto g's r)."""
    g_ref = g_ref.interp(r=g["r"])
    diff = np.abs(g - g_ref).where(g["r"] <= r_max, drop=True)
    out = diff.integrate("r")
    out.attrs = {"units": "angstrom", "long_name": f"area between g(r) and the reference's, 0-{r_max:g} Å"}
    return out


def first_peak(g: xr.DataArray, r_min: float, r_max: float) -> xr.DataArray:
    """Position (Å) of the highest point of g(r) within [r_min, r_max] (choose the window around
    the first shell, e.g. 1.2-2.0 Å for the intramolecular H-H peak), refined by a parabola
    through it and its neighbours; reduces ``r``. NaN where the highest point is at an edge."""
    from .spectra import peak_position

    out = peak_position(g, "r", (r_min, r_max))
    out.attrs = {"units": "angstrom", "long_name": f"peak of g(r) in {r_min:g}-{r_max:g} Å"}
    return out
