"""Outputs never alias inputs; nothing existing is replaced without ``--overwrite``.

Every command names its inputs and outputs before it writes anything; :func:`refuse_aliasing`
refuses an output that is, contains or lies inside any input (so ``--out X.zarr --overwrite``
with ``X.zarr`` an input cannot destroy it), and :func:`refuse_existing` an output that exists
unless overwriting was asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .errors import UserError

__all__ = ["AliasError", "refuse_aliasing", "refuse_existing", "check_output_parent"]


class AliasError(UserError, ValueError):
    """An output would overwrite (part of) an input, or replace an existing file unasked."""


def _resolved(path) -> Path:
    return Path(path).expanduser().resolve(strict=False)


def refuse_aliasing(outputs: dict[str, str | Path], inputs: dict[str, str | Path | None],
                    containers: Iterable[str] = ()) -> None:
    """Raise :class:`AliasError` if an output is, contains or lies inside an input.

    ``outputs`` and ``inputs`` map a label (the option or argument, e.g. ``"--out"``) to a path;
    ``None`` inputs are skipped. Paths are compared after resolving symlinks and ``..``. Inputs
    whose label is in ``containers`` are plain directories holding input files (a CP2K run
    directory): an output may lie inside them, just not be or contain them.
    """
    containers = set(containers)
    for out_label, out in outputs.items():
        o = _resolved(out)
        for in_label, inp in inputs.items():
            if inp is None:
                continue
            i = _resolved(inp)
            if o == i:
                how = "is"
            elif i in o.parents and in_label not in containers:
                how = "lies inside"
            elif o in i.parents:
                how = "contains"
            else:
                continue
            raise AliasError(f"{out_label} {out} {how} the input {in_label} {inp}: writing it would destroy the "
                             "input; choose an output elsewhere")


def refuse_existing(outputs: Iterable[str | Path], overwrite: bool, option: str = "--out") -> None:
    """Raise :class:`AliasError` if any output exists and ``overwrite`` is false."""
    if overwrite:
        return
    for out in outputs:
        if Path(out).exists() or Path(out).is_symlink():
            raise AliasError(f"{out} already exists; choose another {option} or pass --overwrite")


def check_output_parent(out: str | Path) -> None:
    """Raise :class:`AliasError` if a directory above ``out`` exists as something else (a file):
    the output could not be created there (instead of ``[Errno 17] File exists``)."""
    out = Path(out)
    for parent in [out.parent, *out.parent.parents]:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise AliasError(f"cannot write {out}: {parent} is a file, not a directory; choose an output "
                                 "elsewhere")
            return
