"""Read, edit and write CP2K input (and restart) files as a section tree.

CP2K inputs are nested ``&SECTION [parameter] ... &END [SECTION]`` blocks of
``KEYWORD values`` lines. This module parses them into :class:`Section` objects
(names compared case-insensitively, order kept), lets the reference runner set a
few keywords (project, steps, cell, coordinate file, restart), and renders the
tree back to text CP2K reads. It also extracts what ingestion needs from an input
or restart file: the cell and explicitly given masses.

Preprocessor lines (``@SET``, ``@IF``, ``@INCLUDE``) are not expanded: a file using
them is refused with a message saying so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..units import BOHR_ANGSTROM
from ..errors import UserError

__all__ = ["Section", "parse_input", "read_input", "cell_from_input", "masses_from_input"]


class InputError(UserError, ValueError):
    """A CP2K input file could not be understood."""


@dataclass
class Section:
    """One ``&NAME parameter`` block: keywords (in order) and subsections."""

    name: str
    parameter: str = ""
    keywords: list[tuple[str, str]] = field(default_factory=list)
    sections: list["Section"] = field(default_factory=list)

    # ---- lookup -------------------------------------------------------------
    def section(self, path: str) -> "Section | None":
        """First subsection along a ``/``-separated path (case-insensitive), or None."""
        node: Section | None = self
        for part in path.strip("/").split("/"):
            if node is None:
                return None
            node = next((s for s in node.sections if s.name.upper() == part.upper()), None)
        return node

    def all_sections(self, name: str) -> list["Section"]:
        return [s for s in self.sections if s.name.upper() == name.upper()]

    def keyword(self, name: str) -> str | None:
        for k, v in self.keywords:
            if k.upper() == name.upper():
                return v
        return None

    # ---- editing ------------------------------------------------------------
    def ensure(self, path: str) -> "Section":
        """Subsection along ``path``, created (empty) where missing."""
        node = self
        for part in path.strip("/").split("/"):
            child = node.section(part)
            if child is None:
                child = Section(part.upper())
                node.sections.append(child)
            node = child
        return node

    def set(self, name: str, value: str) -> None:
        """Set keyword ``name`` (replacing every earlier occurrence) to ``value``."""
        kept = [(k, v) for k, v in self.keywords if k.upper() != name.upper()]
        self.keywords = kept + [(name.upper(), str(value))]

    def remove_section(self, name: str) -> None:
        self.sections = [s for s in self.sections if s.name.upper() != name.upper()]

    # ---- output -------------------------------------------------------------
    def render(self, indent: int = 0) -> str:
        pad = "  " * indent
        lines = [f"{pad}&{self.name}{(' ' + self.parameter) if self.parameter else ''}"]
        lines += [f"{pad}  {k} {v}".rstrip() for k, v in self.keywords]
        lines += [s.render(indent + 1) for s in self.sections]
        lines.append(f"{pad}&END {self.name}")
        return "\n".join(lines)


def render_input(root: Section) -> str:
    """Text of a whole input (the root's subsections, top level)."""
    return "\n".join(s.render() for s in root.sections) + "\n"


_COMMENT = re.compile(r"\s[!#].*$")


def parse_input(text: str, source: str = "<input>") -> Section:
    """Parse CP2K input text into a root :class:`Section` named ``ROOT``."""
    root = Section("ROOT")
    stack = [root]
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "!#":
            continue
        line = _COMMENT.sub("", " " + line).strip()
        if line.startswith("@"):
            raise InputError(
                f"{source}:{lineno}: preprocessor directive {line.split()[0]!r} is not supported "
                "here; expand it first (write the file without @SET/@IF/@INCLUDE)")
        if line.startswith("&"):
            head, _, rest = line[1:].partition(" ")
            if head.upper() == "END":
                if len(stack) == 1:
                    raise InputError(f"{source}:{lineno}: &END without an open section")
                closing = rest.strip()
                if closing and closing.upper() != stack[-1].name.upper():
                    raise InputError(f"{source}:{lineno}: &END {closing} closes section "
                                     f"&{stack[-1].name}")
                stack.pop()
            else:
                sec = Section(head, rest.strip())
                stack[-1].sections.append(sec)
                stack.append(sec)
            continue
        key, _, value = line.partition(" ")
        stack[-1].keywords.append((key, value.strip()))
    if len(stack) != 1:
        raise InputError(f"{source}: section &{stack[-1].name} is never closed (missing &END)")
    return root


def read_input(path: str | Path) -> Section:
    path = Path(path)
    return parse_input(path.read_text(errors="replace"), source=str(path))


_UNIT_FACTORS = {"angstrom": 1.0, "bohr": BOHR_ANGSTROM, "nm": 10.0, "pm": 0.01}


def _values_angstrom(value: str, source: str, keyword: str) -> np.ndarray:
    """Numbers of a keyword, converted from an optional ``[unit]`` prefix to Å."""
    factor = 1.0
    m = re.match(r"\[\s*([A-Za-z_]+)\s*\]\s*(.*)", value)
    if m:
        unit = m.group(1).lower()
        if unit not in _UNIT_FACTORS:
            raise InputError(f"{source}: {keyword} has unit [{m.group(1)}]; expected one of "
                             f"{sorted(_UNIT_FACTORS)}")
        factor = _UNIT_FACTORS[unit]
        value = m.group(2)
    try:
        nums = np.array([float(v) for v in value.split()])
    except ValueError:
        raise InputError(f"{source}: {keyword} = {value!r} is not a list of numbers") from None
    return nums * factor


def cell_from_input(root: Section, source: str = "<input>") -> np.ndarray | None:
    """Cell vectors (rows a, b, c; Å) from ``FORCE_EVAL/SUBSYS/CELL``, or None if absent."""
    cell = root.section("FORCE_EVAL/SUBSYS/CELL")
    if cell is None:
        return None
    if cell.keyword("CELL_FILE_NAME") is not None:
        raise InputError(f"{source}: the cell is read from CELL_FILE_NAME "
                         f"{cell.keyword('CELL_FILE_NAME')!r}; pass the cell with --cell instead")
    vecs = [cell.keyword(k) for k in ("A", "B", "C")]
    if all(v is not None for v in vecs):
        out = np.array([_values_angstrom(v, source, k) for v, k in zip(vecs, "ABC")])
        if out.shape != (3, 3):
            raise InputError(f"{source}: CELL A/B/C must each have 3 numbers")
        return out
    abc = cell.keyword("ABC")
    if abc is None:
        raise InputError(f"{source}: &CELL has neither ABC nor A, B, C")
    lengths = _values_angstrom(abc, source, "ABC")
    if lengths.shape != (3,):
        raise InputError(f"{source}: CELL ABC must have 3 numbers, got {abc!r}")
    angles = cell.keyword("ALPHA_BETA_GAMMA")
    alpha, beta, gamma = (90.0, 90.0, 90.0) if angles is None else [
        float(x) for x in re.sub(r"\[.*?\]", "", angles).split()]
    return cell_matrix(lengths, (alpha, beta, gamma))


def cell_matrix(lengths, angles_deg) -> np.ndarray:
    """Cell vectors (rows, Å) from lengths a, b, c and angles alpha, beta, gamma (degrees),
    with a along x and b in the xy plane (CP2K's and ASE's convention)."""
    a, b, c = (float(x) for x in lengths)
    al, be, ga = np.deg2rad(np.asarray(angles_deg, dtype=float))
    va = np.array([a, 0.0, 0.0])
    vb = np.array([b * np.cos(ga), b * np.sin(ga), 0.0])
    cx = c * np.cos(be)
    cy = c * (np.cos(al) - np.cos(be) * np.cos(ga)) / np.sin(ga)
    vc = np.array([cx, cy, np.sqrt(max(c * c - cx * cx - cy * cy, 0.0))])
    out = np.array([va, vb, vc])
    out[np.abs(out) < 1e-12 * max(a, b, c)] = 0.0
    return out


def masses_from_input(root: Section, source: str = "<input>") -> dict[str, float]:
    """Masses (amu) given explicitly with ``&KIND name / MASS`` in ``FORCE_EVAL/SUBSYS``."""
    subsys = root.section("FORCE_EVAL/SUBSYS")
    out: dict[str, float] = {}
    if subsys is None:
        return out
    for kind in subsys.all_sections("KIND"):
        mass = kind.keyword("MASS")
        if mass is None:
            continue
        try:
            out[kind.parameter] = float(re.sub(r"\[.*?\]", "", mass))
        except ValueError:
            raise InputError(f"{source}: &KIND {kind.parameter} MASS {mass!r} is not a number") from None
    return out
