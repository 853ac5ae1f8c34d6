"""The store a simulation streams into: frames, per-step thermo, checkpoints, exact resume.

Safe against an interrupt (Ctrl-C, kill, power loss) at any point:

- The store appears under its name complete with its first frame and a step-0 checkpoint
  (written to a temporary path, then renamed): a store that exists can always be resumed.
- zarr writes each file atomically; between files the arrays may disagree in length (an
  append cut short). Nothing trusts that: a checkpoint records how many frames and thermo steps
  were complete when it was written, and resuming (or stopping) trims every array back to it.
- Checkpoints replace each other without a moment with none: the new one is written as
  ``checkpoint_new`` and marked complete last, then ``checkpoint`` becomes ``checkpoint_old``,
  ``checkpoint_new`` becomes ``checkpoint``, and the old one is deleted. Whatever the cut,
  at least one complete checkpoint exists; resuming takes the most advanced complete one.
- Consolidated metadata (what plain ``xr.open_zarr`` reads) is rewritten after every
  checkpoint and at the end, so readers see a consistent snapshot.

The run's fingerprint (model, initial state, settings; sha256) is stored, so ``--resume``
refuses to continue with anything else and says what differs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from ..files import check_output_parent
from ..errors import UserError

__all__ = ["ResumeError", "RunStore", "Checkpoint", "fingerprint", "CHECKPOINTS"]

#: checkpoint groups, most current first (see the module docstring)
CHECKPOINTS = ("checkpoint", "checkpoint_new", "checkpoint_old")


class ResumeError(UserError, ValueError):
    """A store cannot be resumed (not a simulation, no complete checkpoint, a different run)."""


@dataclass(frozen=True)
class Checkpoint:
    """What a run continues from: arrays (positions, velocities, thermostat chain, ...) and counts."""

    arrays: dict
    step: int
    frames: int
    clipped: int
    attrs: dict


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(model_json: dict, positions, velocities, species, masses, box, settings: dict) -> dict:
    """sha256 of the model (coefficients, basis, kind: not its metrics or provenance), of the
    initial state (positions, velocities, species, masses, box bytes) and the settings."""
    model_part = {k: v for k, v in model_json.items() if k not in ("metrics", "provenance")}
    h = hashlib.sha256()
    for a in (positions, velocities, masses, box):
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    h.update("\0".join(map(str, species)).encode())
    return {"model_sha256": _digest(model_part), "initial_state_sha256": h.hexdigest(),
            "settings": json.loads(json.dumps(settings))}


def _remove_stale(path: Path) -> None:
    """Temporary copies of ``path`` left by a run that was killed while creating or replacing it."""
    for stale in path.parent.glob(f".{path.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in path.parent.glob(f".{path.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)


class RunStore:
    """A simulation store being written (see the module docstring). Create with :meth:`create`
    or :meth:`reopen`; then :meth:`append`, :meth:`checkpoint`, :meth:`finish`."""

    def __init__(self, path: Path):
        self.path = Path(path)

    # ---------------------------------------------------------------- creating and reopening
    @classmethod
    def create(cls, path: Path, first: xr.Dataset, chunk_frames: int, checkpoint: dict, checkpoint_attrs: dict,
               overwrite: bool = False) -> "RunStore":
        """Write ``first`` (the frame-0 block with the static variables and attrs) and a step-0
        checkpoint to a temporary path, then rename it to ``path``."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; choose another --out, pass --overwrite or --resume")
        check_output_parent(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path)
        tmp = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            enc = {v: {"chunks": tuple(chunk_frames if d == "frame" else first.sizes[d] for d in first[v].dims)}
                   for v in first.variables if "frame" in first[v].dims}
            first.to_zarr(tmp, mode="w-", consolidated=False, zarr_format=3, encoding=enc)
            store = cls(tmp)
            store._write_group("checkpoint", checkpoint, checkpoint_attrs)
            store._consolidate()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
        return cls(path)

    @classmethod
    def reopen(cls, path: Path, expected: dict) -> tuple["RunStore", Checkpoint]:
        """Open a stopped run to continue it: check its fingerprint against ``expected``, take its
        most advanced complete checkpoint, and trim every array back to it."""
        path = Path(path)
        if not path.exists():
            raise ResumeError(f"{path}: no such store; nothing to resume")
        try:
            root = zarr.open_group(str(path), mode="r", use_consolidated=False)
        except Exception as exc:  # not a zarr store
            raise ResumeError(f"{path}: not a simulation store ({type(exc).__name__}: {exc})") from None
        if "run_fingerprint" not in root.attrs:
            raise ResumeError(f"{path}: not a simulation store written by `ensemble simulate` of this version "
                              "(no run fingerprint); nothing to resume")
        found = json.loads(root.attrs["run_fingerprint"])
        problems = []
        if found.get("model_sha256") != expected["model_sha256"]:
            problems.append("the model differs (its coefficients, basis or kind)")
        if found.get("initial_state_sha256") != expected["initial_state_sha256"]:
            problems.append("the initial state differs (positions, velocities, species, masses or box)")
        fs, es = found.get("settings", {}), expected["settings"]
        for key in sorted(set(fs) | set(es)):
            if fs.get(key) != es.get(key):
                problems.append(f"{key} was {fs.get(key)!r}, now {es.get(key)!r}")
        if problems:
            raise ResumeError(f"{path}: --resume needs the run that made this store: " + "; ".join(problems))
        store = cls(path)
        _remove_stale(path)
        ck = store._best_checkpoint()
        store._normalize_checkpoints()
        store._trim(ck)
        store._consolidate()
        return store, ck

    # ---------------------------------------------------------------- writing
    def append(self, frames: xr.Dataset | None, thermo: xr.Dataset | None, thermo_chunk: int) -> None:
        """Append a block of frames and of per-step thermo (each may be None)."""
        root = zarr.open_group(str(self.path), mode="r", use_consolidated=False)
        attrs = dict(root.attrs)            # xarray writes a dataset's attrs over the group's: keep them
        if frames is not None and frames.sizes.get("frame", 0):
            frames.attrs = attrs
            frames.to_zarr(self.path, append_dim="frame", consolidated=False, zarr_format=3)
        if thermo is not None and thermo.sizes.get("md_step", 0):
            thermo.attrs = attrs
            if "thermo_temperature" in root:
                thermo.to_zarr(self.path, append_dim="md_step", consolidated=False, zarr_format=3)
            else:
                thermo.to_zarr(self.path, mode="a", consolidated=False, zarr_format=3,
                               encoding={v: {"chunks": (thermo_chunk,)} for v in thermo.variables})

    def checkpoint(self, arrays: dict, attrs: dict) -> None:
        """Replace the checkpoint (never a moment without a complete one), then consolidate."""
        import os

        self._remove_group("checkpoint_new")
        self._write_group("checkpoint_new", arrays, attrs)
        cur, new, old = (self.path / n for n in CHECKPOINTS)
        self._remove_group("checkpoint_old")
        if cur.exists():
            os.replace(cur, old)
        os.replace(new, cur)
        self._remove_group("checkpoint_old")
        self._consolidate()

    def set_attrs(self, **attrs) -> None:
        root = zarr.open_group(str(self.path), mode="r+", use_consolidated=False)
        root.attrs.update(attrs)

    def rollback(self) -> Checkpoint:
        """Trim every array to the most advanced complete checkpoint (what a stopped run keeps)."""
        ck = self._best_checkpoint()
        self._normalize_checkpoints()
        self._trim(ck)
        return ck

    def finish(self, status: str) -> None:
        self.set_attrs(status=status)
        self._consolidate()

    # ---------------------------------------------------------------- internals
    def _write_group(self, name: str, arrays: dict, attrs: dict) -> None:
        root = zarr.open_group(str(self.path), mode="r+", use_consolidated=False)
        g = root.create_group(name)
        for key, value in arrays.items():
            g.create_array(key, data=np.asarray(value))
        g.attrs.update(attrs)
        g.attrs["complete"] = True            # written last: a group without it was cut short

    def _remove_group(self, name: str) -> None:
        if (self.path / name).exists():
            shutil.rmtree(self.path / name)

    def _checkpoints(self) -> list[tuple[str, Checkpoint]]:
        root = zarr.open_group(str(self.path), mode="r", use_consolidated=False)
        out = []
        for name in CHECKPOINTS:
            if not (self.path / name).exists():
                continue
            try:
                g = root[name]
                attrs = dict(g.attrs)
                if not attrs.get("complete"):
                    continue
                arrays = {k: np.asarray(a[...]) for k, a in g.arrays()}
            except Exception:  # a group cut short or half deleted: not a checkpoint
                continue
            out.append((name, Checkpoint(arrays, int(attrs["step"]), int(attrs["frames"]),
                                         int(attrs.get("clipped", 0)), attrs)))
        return out

    def _best_checkpoint(self) -> Checkpoint:
        found = self._checkpoints()
        if not found:
            raise ResumeError(f"{self.path}: no complete checkpoint in the store; start the run again "
                              "(--overwrite)")
        return max(found, key=lambda x: x[1].step)[1]

    def _normalize_checkpoints(self) -> None:
        """Leave one checkpoint, named ``checkpoint``: the most advanced complete one."""
        import os

        found = self._checkpoints()
        best = max(found, key=lambda x: x[1].step)[0]
        if best != "checkpoint":
            self._remove_group("checkpoint")
            os.replace(self.path / best, self.path / "checkpoint")
        for name in CHECKPOINTS[1:]:
            self._remove_group(name)

    def _trim(self, ck: Checkpoint) -> None:
        if ck.step == 0:        # per-step thermo starts after step 0: anything there was cut short, start it again
            for stale in [self.path / "md_step", *self.path.glob("thermo_*")]:
                if stale.is_dir():
                    shutil.rmtree(stale)
        root = zarr.open_group(str(self.path), mode="r+", use_consolidated=False)
        has_thermo = "thermo_temperature" in root
        for name, arr in list(root.arrays()):
            dims = arr.metadata.dimension_names or ()
            if dims and dims[0] == "frame" and arr.shape[0] != ck.frames:
                if arr.shape[0] < ck.frames:
                    raise ResumeError(f"{self.path}: array {name!r} holds {arr.shape[0]} frames but the checkpoint "
                                      f"counts {ck.frames}; the store is damaged")
                arr.resize((ck.frames,) + arr.shape[1:])
            if dims and dims[0] == "md_step":
                if ck.step == 0 or not has_thermo:      # thermo created after the checkpoint: start it again
                    del root[name]
                elif arr.shape[0] != ck.step:
                    if arr.shape[0] < ck.step:
                        raise ResumeError(f"{self.path}: array {name!r} holds {arr.shape[0]} steps but the "
                                          f"checkpoint is at step {ck.step}; the store is damaged")
                    arr.resize((ck.step,) + arr.shape[1:])

    def _consolidate(self) -> None:
        with warnings.catch_warnings():      # consolidated metadata: a zarr v3 extension xarray and zarr read
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(str(self.path))
