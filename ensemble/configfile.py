"""Reading TOML configs at the edges: one place for "missing file" and "not TOML" errors."""

from __future__ import annotations

import tomllib
from pathlib import Path


def read_toml(path: str | Path, what: str, error: type[Exception] = ValueError) -> dict:
    """The parsed TOML at ``path``; ``error`` naming the file when it is missing or not TOML.

    ``what`` names the kind of file in the message (``"fit config"``, ``"ensemble config"``).
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such {what}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML ({exc})") from None
