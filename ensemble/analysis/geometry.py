"""Kinetic energy and temperatures per species; the geometry of water from the per-frame topology.

O-H bonds are each hydrogen's distance to its *current* nearest oxygen (continuous through a
proton hop, so bond statistics and the bond spectrum stay meaningful in reactive water);
H-O-H angles are those of the oxygens that hold exactly two hydrogens in that frame, so
statistics are weighted by the molecules present. :func:`angle_from_distances` turns an
intramolecular H-H distance and an O-H bond into the angle they imply: the cross-check of the
angle against the first peak of g_HH.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .. import thermo

__all__ = ["kinetic", "species_temperature", "angle_from_distances", "weighted_frame_stats"]


def kinetic(ds: xr.Dataset) -> tuple[xr.DataArray, xr.DataArray]:
    """The store's kinetic energy (eV) and temperature (K), or the same from the velocities
    (3N - 3 degrees of freedom, as CP2K)."""
    if "kinetic_energy" in ds and "temperature" in ds:
        return ds["kinetic_energy"], ds["temperature"]
    ke = _atom_ke(ds).sum("atom")
    temp = xr.apply_ufunc(thermo.temperature, ke, kwargs={"dof": thermo.degrees_of_freedom(ds.sizes["atom"])},
                          dask="parallelized", output_dtypes=[float])
    ke.attrs = {"units": "eV", "long_name": "kinetic energy"}
    temp.attrs = {"units": "K", "long_name": "temperature (3N - 3 degrees of freedom)"}
    return ke.rename("kinetic_energy"), temp.rename("temperature")


def _atom_ke(ds: xr.Dataset) -> xr.DataArray:
    return xr.apply_ufunc(thermo.atom_kinetic_energy, ds["velocities"], ds["masses"],
                          input_core_dims=[["atom", "xyz"], ["atom"]], output_core_dims=[["atom"]],
                          dask="parallelized", output_dtypes=[float])


def species_temperature(ds: xr.Dataset) -> xr.DataArray:
    """Kinetic temperature per species (frame, species), K: mean kinetic energy per atom / (3/2 k_B)."""
    labels = xr.DataArray(np.array([str(s) for s in ds["species"].values], dtype=object), dims="atom",
                          name="species")            # in memory: grouping needs known labels
    mean_ke = _atom_ke(ds).drop_vars("species", errors="ignore").groupby(labels).mean()
    out = xr.apply_ufunc(thermo.temperature, mean_ke, kwargs={"dof": 3}, dask="parallelized", output_dtypes=[float])
    out = out.transpose("frame", "species")
    out.attrs = {"units": "K", "long_name": "kinetic temperature per species"}
    return out.rename("species_temperature")


def angle_from_distances(r_hh, r_oh):
    """H-O-H angle (deg) of an isosceles molecule with H-H distance ``r_hh`` and O-H ``r_oh`` (Å)."""
    return np.degrees(2.0 * np.arcsin(np.clip(np.asarray(r_hh, float) / (2.0 * np.asarray(r_oh, float)), -1, 1)))


def weighted_frame_stats(values: xr.DataArray, dim: str) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
    """Per-frame mean, standard deviation and count of the finite entries along ``dim``.

    NaN marks entries absent in a frame (an O that is not H2O right now), so the means are
    over the molecules present; the counts let time averages weight frames by them.
    """
    present = np.isfinite(values)
    count = present.sum(dim)
    total = values.where(present, 0.0).sum(dim)
    mean = total / count.where(count > 0)
    var = (values.where(present, 0.0) ** 2).sum(dim) / count.where(count > 0) - mean ** 2
    return mean, np.sqrt(var.clip(min=0.0)), count
