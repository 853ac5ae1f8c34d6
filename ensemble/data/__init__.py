"""The embedded default data set: a real CP2K trajectory shipped with the package.

``water-spcfw-128.zarr.zip`` holds 1000+ frames (0.5 fs) of 128 flexible SPC/Fw
water molecules run by CP2K's FIST after a 10 ps CSVR equilibration at 300 K, made
with ``ensemble reference configs/reference/fist-spcfw-128.toml --steps 1000``
(exact provenance: the ``reference_run`` attribute, printed by ``ensemble info``).

To stay a few MB the archive is a zarr v3 zip whose trajectory arrays are stored
time-contiguous (atom, xyz, frame) and quantized to fixed steps far below any
physical scale (:data:`QUANTA`: 1e-5 Å, 1e-6 Å/fs, 1e-4 eV/Å), then twice
delta-encoded along time and LZMA-compressed (numcodecs' FixedScaleOffset, Delta,
LZMA). The energies CP2K wrote are kept exactly. :func:`write_default_store`
unpacks it into a regular trajectory store and re-checks the kinetic energy from
the (quantized) velocities against CP2K's .ener values.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from ..io.store import (UNITS, atomic_output, create_store, default_chunk_frames, frame_block, open_trajectory,
                        with_static, write_frames)

__all__ = ["DEFAULT_DATA", "QUANTA", "pack_store", "load_default", "write_default_store"]

DEFAULT_DATA = Path(__file__).with_name("water-spcfw-128.zarr.zip")

#: quantization step of each archived trajectory array, in package units
QUANTA = {"positions": 1e-5, "velocities": 1e-6, "forces": 1e-4}


def _codecs(step: float):
    import zarr.codecs.numcodecs as nz

    filters = [nz.FixedScaleOffset(offset=0, scale=1.0 / step, dtype="<f8", astype="<i4"),
               nz.Delta(dtype="<i4"), nz.Delta(dtype="<i4")]
    return filters, [nz.LZMA(preset=9 | 2**31)]


def pack_store(store: str | Path, out: str | Path) -> Path:
    """Write the compact archive of a trajectory store (how the embedded data was made)."""
    ds = open_trajectory(store).compute()
    out = Path(out)
    for name, step in QUANTA.items():
        limit = np.abs(ds[name].values).max() / step
        if limit >= 2**31 - 1:
            raise ValueError(f"{name} exceeds the int32 range at quantum {step}")
    with atomic_output(out, overwrite=True) as tmp:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Numcodecs codecs are not in the Zarr version 3.*")
            warnings.filterwarnings("ignore", message=".*not part of the Zarr format 3.*")
            zs = zarr.storage.ZipStore(tmp, mode="w")
            g = zarr.create_group(zs, zarr_format=3, attributes={**ds.attrs, "archive": "ensemble default data",
                                                                  "quanta": QUANTA})
            for name, step in QUANTA.items():
                x = np.ascontiguousarray(ds[name].values.transpose(1, 2, 0))
                filters, compressors = _codecs(step)
                a = g.create_array(name, shape=x.shape, chunks=x.shape, dtype="f8", filters=filters,
                                   compressors=compressors, dimension_names=("atom", "xyz", "frame"),
                                   attributes={"units": UNITS[name], "quantum": step})
                a[:] = x
            for name in ("step", "time", "masses", "cell", "kinetic_energy", "potential_energy",
                         "conserved_energy"):
                v = ds[name]
                note = {"note": "CP2K's .ener value (for the kinetic energy check)"} if name == "kinetic_energy" else {}
                g.create_array(name, data=np.asarray(v.values), dimension_names=v.dims,
                               attributes={"units": UNITS[name], **note})
            species = g.create_array("species", shape=(ds.sizes["atom"],), dtype=str,
                                     dimension_names=("atom",), attributes={"units": "none"})
            species[:] = np.array([str(x) for x in ds["species"].values], dtype=object)
            zs.close()
    return out


def _read_archive(path: Path) -> dict:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Numcodecs codecs are not in the Zarr version 3.*")
        warnings.filterwarnings("ignore", message=".*not part of the Zarr format 3.*")
        zs = zarr.storage.ZipStore(path, mode="r")
        g = zarr.open_group(zs, mode="r", zarr_format=3)
        out = {name: g[name][:] for name in g.array_keys()}
        out["attrs"] = dict(g.attrs)
        zs.close()
    return out


def load_default(path: str | Path = DEFAULT_DATA) -> xr.Dataset:
    """The embedded trajectory as an in-memory Dataset in the trajectory schema."""
    raw = _read_archive(Path(path))
    fax = {k: np.ascontiguousarray(raw[k].transpose(2, 0, 1)) for k in QUANTA}
    masses = raw["masses"]
    block = frame_block(step=raw["step"], time_fs=raw["time"], positions=fax["positions"],
                        velocities=fax["velocities"], forces=fax["forces"], masses=masses,
                        potential_energy=raw["potential_energy"], conserved_energy=raw["conserved_energy"])
    cp2k_ke = raw["kinetic_energy"]
    rel = np.abs(block["kinetic_energy"].values - cp2k_ke) / cp2k_ke
    attrs = {k: v for k, v in raw["attrs"].items() if k not in ("schema", "archive")}
    attrs["kinetic_energy_check"] = {"max_rel_error": float(rel.max()), "frames": int(rel.size),
                                     "tolerance": 1e-3, "reference": "CP2K .ener kinetic energy (archived)"}
    attrs["created_by"] = f"{attrs.get('created_by', 'ensemble')}; unpacked from {Path(path).name}"
    if rel.max() > 1e-3:
        raise ValueError(f"{path}: kinetic energy from the archived velocities differs from CP2K's by "
                         f"{rel.max():.2e} relative: the archive is damaged")
    return with_static(block, species=raw["species"], masses=masses, cell=raw["cell"],
                       mass_source=attrs.get("mass_source", ""), attrs=attrs)


def write_default_store(out: str | Path, overwrite: bool = False, chunk_frames: int | None = None) -> dict:
    """Unpack the embedded data into a trajectory store at ``out``; returns its attrs."""
    ds = load_default()
    n = ds.sizes["frame"]
    chunk = min(int(chunk_frames or default_chunk_frames(ds.sizes["atom"])), n)
    with atomic_output(out, overwrite=overwrite) as tmp:
        create_store(tmp, ds.isel(frame=slice(0, 1)), n, chunk)
        for a in range(0, n, chunk):
            write_frames(tmp, ds.isel(frame=slice(a, a + chunk)), a)
    return dict(ds.attrs)
