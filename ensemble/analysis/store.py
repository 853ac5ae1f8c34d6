"""One statistics Dataset per run (schema ``ensemble.stats/2``): build it lazily, merge pieces,
select frames, write and read it.

:func:`analyze` puts every per-frame and windowed statistic of a trajectory in one Dataset,
lazily (dask over frame chunks). Every variable declares in ``attrs["merge"]`` how partial
results combine (:data:`MERGE`): per-frame series concatenate along ``frame``, windowed
spectra along ``window`` (windows start at absolute step multiples), histograms ``sum``.
So the same analysis runs on a whole store, on frame chunks in parallel, or on pieces merged
afterwards (:func:`merge`), and gives the same numbers when pieces are cut at window
boundaries. Derived figures (time averages, proton-transfer rates, ion lifetimes, stability)
are computed from merged statistics, never merged themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xarray as xr

from .. import __version__
from .geometry import kinetic, species_temperature, weighted_frame_stats
from .rdf import rdf
from .spectra import DEFAULT_PAD, frame_interval, oh_spectrum, spectral_peak, vdos
from .topology import BOND_MAX_ANGSTROM, AnalysisError, static_box, topology

__all__ = ["MERGE", "STATS_SCHEMA", "analyze", "merge", "write_stats", "open_stats", "select_frames", "histogram",
           "stats_summary_json", "BOND_EDGES", "ANGLE_EDGES", "split_frame_range"]

STATS_SCHEMA = "ensemble.stats/2"
STATS_CHUNK_FRAMES = 1024                    #: frames per chunk in a statistics store
BOND_EDGES = np.linspace(0.6, 2.0, 281)      #: Å, 0.005 Å bins for O-H bond-length histograms
ANGLE_EDGES = np.linspace(60.0, 180.0, 241)  #: deg, 0.5 deg bins for H-O-H angle histograms

_FRAME = ("kinetic_energy", "temperature", "species_temperature", "finite", "h_owner", "oh_bond", "oh_second",
          "o_hydrogens", "hoh_angle", "hh_intra", "h3o_angle", "oo_min", "n_water", "n_hydronium", "n_hydroxide",
          "n_other_oxygen", "n_free_hydrogen", "max_h_per_oxygen", "oh_bond_mean", "oh_bond_std", "hoh_angle_mean",
          "hoh_angle_std", "hh_intra_mean", "h3o_angle_mean", "rdf")
#: how each statistic's partial results combine
MERGE = {**{name: "concat(frame)" for name in _FRAME},
         "oh_spectrum": "concat(window)", "oh_spectrum_peak": "concat(window)", "vdos": "concat(window)",
         "oh_bond_hist": "sum", "hoh_angle_hist": "sum"}


def histogram(da: xr.DataArray, edges: np.ndarray, dim: str) -> xr.DataArray:
    """Counts of the finite values of ``da`` in the bins ``edges`` (dimension ``dim``, coordinate:
    bin centres), lazily for dask arrays; values outside the edges or NaN are not counted.
    Partial histograms merge by summing."""
    import dask.array as dsa

    data = da.data
    if isinstance(data, dsa.Array):
        flat = data.ravel()
        counts, _ = dsa.histogram(dsa.where(dsa.isfinite(flat), flat, np.inf), bins=edges)
    else:
        flat = np.asarray(data).ravel()
        counts, _ = np.histogram(flat[np.isfinite(flat)], bins=edges)
    out = xr.DataArray(counts, dims=dim, coords={dim: 0.5 * (edges[1:] + edges[:-1])})
    out[dim].attrs = {"units": da.attrs.get("units", ""), "bin_width": float(edges[1] - edges[0])}
    out.attrs = {"units": "1", "long_name": f"histogram of {da.attrs.get('long_name', da.name)} (counts)"}
    return out


def _finite_frames(ds: xr.Dataset) -> xr.DataArray:
    ok = np.isfinite(ds["positions"]).all(("atom", "xyz"))
    if "velocities" in ds:
        ok = ok & np.isfinite(ds["velocities"]).all(("atom", "xyz"))
    return ok


def _thermostat_target(ds: xr.Dataset) -> float:
    """The thermostat target (K) of a run written by ``ensemble simulate`` (NaN: none, or not known)."""
    try:
        t = json.loads(ds.attrs.get("simulation_settings", "{}")).get("temperature_K")
        return float(t) if t is not None and np.isfinite(float(t)) and float(t) > 0 else float("nan")
    except (TypeError, ValueError, AttributeError):
        return float("nan")


def analyze(ds: xr.Dataset, *, window_fs: float = 100.0, pad: int = DEFAULT_PAD, rdf_max: float = 6.0,
            rdf_bin: float = 0.02, bond_max_angstrom: float = BOND_MAX_ANGSTROM, source: str = "") -> xr.Dataset:
    """All statistics of one trajectory, lazily (dask), in one Dataset (schema ``ensemble.stats/2``).

    Per frame: kinetic_energy, temperature, species_temperature, finite, the topology
    (:func:`ensemble.analysis.topology.topology`: h_owner, oh_bond per H, o_hydrogens per O,
    hoh_angle / hh_intra of water, h3o_angle of hydronium, ion counts, oo_min), their per-frame
    means (``oh_bond_mean``/``_std``, ``hoh_angle_mean``/``_std`` over the water molecules
    present, ``hh_intra_mean``, ``h3o_angle_mean``) and g(r). Summed: oh_bond_hist,
    hoh_angle_hist. Windowed (``window_fs``, zero padding ``pad``): oh_spectrum,
    oh_spectrum_peak, vdos; left out, with the reason in ``attrs["spectra"]``, when frames are
    too far apart or too few for one window. Any frame is accepted: ions, free protons, even
    non-finite frames (flagged in ``finite``).
    """
    for name, value in (("window_fs", window_fs), ("rdf_max", rdf_max), ("rdf_bin", rdf_bin),
                        ("bond_max_angstrom", bond_max_angstrom)):
        if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
            raise AnalysisError(f"{name} must be a finite number > 0, got {value!r}")
    if not (isinstance(pad, (int, np.integer)) and not isinstance(pad, bool) and 1 <= pad <= 64):
        raise AnalysisError(f"pad (zero padding factor of spectrum windows) must be an integer in 1..64, got {pad!r}")
    if rdf_bin > rdf_max:
        raise AnalysisError(f"rdf_bin {rdf_bin} Å is wider than the g(r) range rdf_max {rdf_max} Å")
    for name in ("positions", "species", "time", "step"):
        if name not in ds.variables:
            raise AnalysisError(f"the store has no {name!r}; a trajectory store is needed")
    if ds.sizes.get("frame", 0) < 1:
        raise AnalysisError("the store holds no frames")
    box = static_box(ds)
    topo = topology(ds, bond_max_angstrom)
    ke, temp = kinetic(ds) if "velocities" in ds or "temperature" in ds else (None, None)
    bond_mean, bond_std, _ = weighted_frame_stats(topo["oh_bond"], "hydrogen")
    ang_mean, ang_std, _ = weighted_frame_stats(topo["hoh_angle"], "oxygen")
    hh_mean, _, _ = weighted_frame_stats(topo["hh_intra"], "oxygen")
    h3o_mean, _, _ = weighted_frame_stats(topo["h3o_angle"], "oxygen")
    data = dict(topo.data_vars)
    data.update(oh_bond_mean=bond_mean, oh_bond_std=bond_std, hoh_angle_mean=ang_mean, hoh_angle_std=ang_std,
                hh_intra_mean=hh_mean, h3o_angle_mean=h3o_mean, finite=_finite_frames(ds),
                rdf=rdf(ds, r_max=min(rdf_max, 0.5 * float(box.min())), bin_width=rdf_bin))
    if ke is not None:
        data.update(kinetic_energy=ke, temperature=temp)
    if "velocities" in ds:
        data["species_temperature"] = species_temperature(ds)
    out = xr.Dataset(data)
    out = out.drop_vars([c for c in ("species", "masses") if c in out.coords])    # per-atom coords
    out["oh_bond_hist"] = histogram(topo["oh_bond"], BOND_EDGES, "oh_bond_bin")
    out["hoh_angle_hist"] = histogram(topo["hoh_angle"], ANGLE_EDGES, "hoh_angle_bin")
    meta = {"oh_bond_mean": ("angstrom", "mean O-H bond (each H to its nearest O)"),
            "oh_bond_std": ("angstrom", "standard deviation of O-H bonds"),
            "hoh_angle_mean": ("deg", "mean H-O-H angle of the water molecules present"),
            "hoh_angle_std": ("deg", "standard deviation of H-O-H angles of the water molecules present"),
            "hh_intra_mean": ("angstrom", "mean intramolecular H-H distance of the water molecules present"),
            "h3o_angle_mean": ("deg", "mean H-O-H angle of the hydronium ions present (NaN: none)"),
            "finite": ("1", "all positions and velocities finite")}
    for name, (units, long) in meta.items():
        out[name].attrs = {"units": units, "long_name": long}
    spectra = "computed"
    try:
        dt, _ = frame_interval(ds)
        window = int(round(window_fs / dt))
        if "velocities" not in ds:
            raise AnalysisError("the store has no velocities (a configuration set?): no VDOS or spectra")
        spec = oh_spectrum(topo["oh_bond"], ds, window, pad)
        out["oh_spectrum"] = spec
        out["oh_spectrum_peak"] = spectral_peak(spec)
        out["oh_spectrum_peak"].attrs.update(long_name="O-H stretch peak per window",
                                             **{k: spec.attrs[k] for k in ("resolution_cm^-1", "grid_cm^-1")})
        out["vdos"] = vdos(ds, window, pad)
    except AnalysisError as exc:
        spectra = f"not computed: {exc}"
    for name in out.data_vars:
        out[name].attrs["merge"] = MERGE[name]
    out["time"].attrs["units"] = "fs"
    out.attrs = {"schema": STATS_SCHEMA, "source": source, "title": ds.attrs.get("title", ""),
                 "source_status": ds.attrs.get("status", "complete"), "n_atoms": int(ds.sizes["atom"]),
                 "box_angstrom": [float(b) for b in box], "window_fs": float(window_fs), "pad": int(pad),
                 "bond_max_angstrom": float(bond_max_angstrom), "spectra": spectra,
                 "created_by": f"ensemble {__version__} analyze"}
    target = _thermostat_target(ds)
    if np.isfinite(target):          # runs of `ensemble simulate` with a thermostat
        out.attrs["thermostat_target_K"] = target
    return out


def merge(parts):
    """Merge partial results (DataArrays or statistics Datasets) by their declared rules.

    ``concat(frame)`` / ``concat(window)`` concatenate in the given order; ``sum`` adds
    (histograms). Pieces cut at window boundaries merge to exactly the analysis of the whole.
    """
    if isinstance(parts[0], xr.DataArray):
        rule = parts[0].attrs.get("merge", "")
        if rule == "sum":
            return sum(parts[1:], parts[0]).assign_attrs(parts[0].attrs)
        if not rule.startswith("concat("):
            raise AnalysisError(f"{parts[0].name}: no merge rule {rule!r}")
        out = xr.concat(parts, dim=rule[len("concat("):-1])
        out.attrs = dict(parts[0].attrs)
        return out
    merged = {}
    for name in parts[0].data_vars:
        rule = parts[0][name].attrs.get("merge", "")
        if rule.startswith("concat("):
            merged[name] = merge([p[name] for p in parts if name in p])
        elif rule == "sum":
            total = parts[0][name]
            for p in parts[1:]:
                total = total + p[name]
            merged[name] = total.assign_attrs(parts[0][name].attrs)
        else:
            raise AnalysisError(f"{name}: no merge rule {rule!r}")
    out = xr.Dataset(merged)
    out.attrs = dict(parts[0].attrs)
    return out


def split_frame_range(spec: str) -> tuple[str, slice | None]:
    """``PATH[:START:STOP[:STRIDE]]`` -> (PATH, slice or None). Either bound may be empty
    (``ref.zarr:200:`` is frame 200 to the end); a trailing part that is not an integer range
    belongs to the path."""
    parts = str(spec).split(":")
    for n_range in (3, 2):
        if len(parts) > n_range:
            head, tail = parts[:-n_range], parts[-n_range:]
            try:
                bounds = [int(x) if x.strip() else None for x in tail]
            except ValueError:
                continue
            if n_range == 3 and bounds[2] is not None and bounds[2] < 1:
                raise AnalysisError(f"{spec!r}: the frame stride must be >= 1, got {bounds[2]}")
            return ":".join(head), slice(*bounds)
    if len(parts) == 2 and parts[1].strip().lstrip("-").isdigit():
        raise AnalysisError(f"{spec!r}: a frame range is PATH:START:STOP (either may be empty, e.g. "
                            f"{parts[0]}:{parts[1]}: for frame {parts[1]} to the end)")
    return str(spec), None


def select_frames(stats: xr.Dataset, frames: slice) -> xr.Dataset:
    """The statistics of a frame range of a run: per-frame series sliced, only the spectrum windows
    lying wholly inside the range kept, histograms recounted from the selected frames."""
    n = stats.sizes["frame"]
    idx = np.arange(n)[frames]
    if idx.size < 2:
        raise AnalysisError(f"frames {frames.start}:{frames.stop}:{frames.step} select {idx.size} of {n} frames; "
                            "need at least 2")
    out = stats.isel(frame=idx)
    if "window" in stats.dims:
        steps = np.asarray(stats["step"].values)[idx]
        width = int(stats["oh_spectrum"].attrs.get("window_frames", 0)) * int(
            np.median(np.diff(np.asarray(stats["step"].values)))) if n > 1 else 0
        start = np.asarray(stats["window"].values)
        inside = (start >= steps.min()) & (start + width - 1 <= steps.max())
        out = out.isel(window=np.flatnonzero(inside))
    for name, src, edges, dim in (("oh_bond_hist", "oh_bond", BOND_EDGES, "oh_bond_bin"),
                                  ("hoh_angle_hist", "hoh_angle", ANGLE_EDGES, "hoh_angle_bin")):
        if name in out:
            attrs = out[name].attrs
            out[name] = histogram(out[src], edges, dim).assign_attrs(attrs)
    return out


def write_stats(stats: xr.Dataset, out: str | Path, overwrite: bool = False) -> Path:
    """Compute ``stats`` (dask, in parallel) and write it atomically as a zarr v3 store."""
    from ..io.store import atomic_output, write_zarr
    out = Path(out)
    # regular chunks (zarr needs them): frames in blocks, everything else whole
    stats = stats.chunk({d: (min(STATS_CHUNK_FRAMES, n) if d == "frame" else -1) for d, n in stats.sizes.items()})
    for v in stats.variables.values():
        v.encoding = {}
    with atomic_output(out, overwrite=overwrite) as tmp:
        write_zarr(stats, tmp, mode="w")
    return out


def open_stats(path: str | Path) -> xr.Dataset:
    """Open a statistics store written by :func:`write_stats` (loaded: statistics are small)."""
    from ..io.store import open_zarr

    path = Path(path)
    if not path.exists():
        raise AnalysisError(f"{path}: no such statistics store")
    try:
        ds = open_zarr(path)
    except Exception as exc:  # zarr raises many types for a non-store
        raise AnalysisError(f"{path}: not a readable zarr v3 store ({exc})") from None
    schema = ds.attrs.get("schema")
    if schema != STATS_SCHEMA:
        hint = "; re-run `ensemble analyze` on its trajectory" if str(schema).startswith("ensemble.stats/") else ""
        raise AnalysisError(f"{path}: attrs['schema'] is {schema!r}; expected {STATS_SCHEMA!r}{hint}")
    try:
        return ds.load()
    except Exception as exc:  # a missing or corrupt chunk
        raise AnalysisError(f"{path}: cannot read its data ({type(exc).__name__}: {exc})") from None


def stats_summary_json(stats: xr.Dataset) -> str:
    """A few headline numbers of a statistics Dataset, as JSON (for logs and the runner)."""
    from .topology import proton_transfers

    pt = proton_transfers(stats)
    out = {"frames": int(stats.sizes["frame"]),
           "temperature_K": float(stats["temperature"].mean()) if "temperature" in stats else None,
           "oh_bond_angstrom": float(stats["oh_bond_mean"].mean()),
           "hoh_angle_deg": float(np.nanmean(stats["hoh_angle_mean"].values)),
           "hydronium_per_frame": float(stats["n_hydronium"].mean()),
           "hydroxide_per_frame": float(stats["n_hydroxide"].mean()),
           "proton_transfers": pt.count, "proton_transfer_rate_per_molecule_ps": pt.rate_per_molecule_ps}
    if "oh_spectrum" in stats:
        spec = stats["oh_spectrum"]
        out["oh_stretch_peak_cm^-1"] = float(spectral_peak(spec.mean("window")))
        out["spectral_resolution_cm^-1"] = float(spec.attrs["resolution_cm^-1"])
    return json.dumps(out)
