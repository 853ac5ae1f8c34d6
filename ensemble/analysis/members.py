"""Across ensemble members: one Dataset with a ``member`` dimension (merge: concat(member))."""

from __future__ import annotations

import numpy as np
import xarray as xr

from .. import __version__
from .scalars import run_scalars
from .stability import CRITERIA, stability
from .topology import AnalysisError

__all__ = ["aggregate_members", "SERIES"]

#: per-frame series carried into the aggregate, on a common axis of time since each member's start
SERIES = ("temperature", "species_temperature", "oh_bond_mean", "oh_bond_std", "hoh_angle_mean", "hoh_angle_std",
          "n_hydronium", "n_hydroxide")


def aggregate_members(stats: dict[str, xr.Dataset], meta: dict[str, dict], *, reference: xr.Dataset | None = None,
                      n_blocks: int = 8) -> xr.Dataset:
    """Merge the statistics of ensemble members into one Dataset with a ``member`` dimension.

    Per member (coords ``model``, ``temperature_K``, ``tile``, ``seed``, ``status`` from
    ``meta``): the time-averaged figures of :func:`run_scalars` with their errors (``<key>``
    and ``<key>_err``), the stability criteria (against ``reference`` when given):
    ``time_to_failure`` (earliest), ``failed_criterion`` and ``<criterion>_time``; the per-frame
    series (``<name>_series``) on a common axis of time since the member's start (``run_time``;
    NaN beyond a member's end), and the time-averaged g(r), O-H spectrum and VDOS.
    """
    ids = list(stats)
    if not ids:
        raise AnalysisError("no member statistics to aggregate")
    per = []
    scalar_attrs: dict[str, dict] = {}
    for mid in ids:
        s = stats[mid]
        t = np.asarray(s["time"].values, float)
        names = [n for n in SERIES if n in s]
        series = s[names].drop_vars(["step", "time"]).assign_coords(run_time=("frame", t - t[0]))
        series = series.swap_dims(frame="run_time")
        series = series.rename({v: f"{v}_series" for v in series.data_vars})     # the scalars keep the plain names
        scalars = run_scalars(s, n_blocks)
        for k, v in scalars.items():
            scalar_attrs.setdefault(k, {"units": v.units, "long_name": v.label, "note": v.note})
            scalar_attrs.setdefault(f"{k}_err", {"units": v.units, "long_name": f"standard error of {v.label}"})
        data = {k: xr.DataArray(v.value[0], attrs={"units": v.units, "long_name": v.label, "note": v.note})
                for k, v in scalars.items()}
        data.update({f"{k}_err": xr.DataArray(v.value[1], attrs={"units": v.units, "long_name": f"standard error of {v.label}"})
                     for k, v in scalars.items()})
        st = stability(s, reference)
        data["time_to_failure"] = xr.DataArray(np.nan if st["time_fs"] is None else st["time_fs"],
                                               attrs={"units": "fs", "long_name": "earliest failure (NaN: none)",
                                                      "criteria": ", ".join(CRITERIA)})
        data["failed_criterion"] = xr.DataArray(st["criterion"] or "", attrs={"units": "1",
                                                                              "long_name": "criterion that failed first"})
        for name in CRITERIA:
            c = st["criteria"][name]
            data[f"{name}_time"] = xr.DataArray(np.nan if c["time_fs"] is None else c["time_fs"],
                                                attrs={"units": "fs", "long_name": f"time the {name} criterion fired",
                                                       "cause": c["cause"] or ""})
        data["duration"] = xr.DataArray(st["duration_fs"], attrs={"units": "fs", "long_name": "run length"})
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
    out["failed_criterion"] = out["failed_criterion"].astype(object)
    for name, attrs in scalar_attrs.items():          # concat drops variable attrs: put the units back
        out[name].attrs = dict(attrs)
    out["run_time"].attrs["units"] = "fs"
    out["temperature_K"].attrs = {"units": "K", "long_name": "thermostat target"}
    for name in ("member", "model", "tile", "seed", "status"):
        out[name].attrs["units"] = "1"
    for name in ("rdf_mean", "oh_spectrum_mean", "vdos_mean"):
        if name in out:
            out[name].attrs["units"] = {"rdf_mean": "1", "oh_spectrum_mean": "angstrom^2 cm", "vdos_mean": "cm"}[name]
    for name in out.data_vars:
        src = name.removesuffix("_series")
        out[name].attrs.setdefault("units", stats[ids[0]][src].attrs.get("units", "1") if src in stats[ids[0]]
                                   else "1")
        out[name].attrs["merge"] = "concat(member)"
    out.attrs = {"schema": "ensemble.aggregate/2", "n_blocks": n_blocks, "created_by": f"ensemble {__version__}"}
    return out
