"""Chemical elements: symbols, atomic numbers and CP2K's default masses.

The masses (amu) are the standard atomic weights CP2K uses by default when an
input gives no ``MASS`` (IUPAC 2005/2006 values, as in CP2K's periodic table; for
H and O they reproduce the kinetic energies CP2K writes to ~1e-9).
"""

from __future__ import annotations

SYMBOLS = (
    "H", "He", "Li", "Be", "B", "C", "N", "O", "F", "Ne", "Na", "Mg", "Al", "Si", "P", "S",
    "Cl", "Ar", "K", "Ca", "Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Ga",
    "Ge", "As", "Se", "Br", "Kr",
)

#: CP2K default masses, amu
CP2K_MASSES_AMU = {
    "H": 1.00794, "He": 4.002602, "Li": 6.941, "Be": 9.012182, "B": 10.811, "C": 12.0107,
    "N": 14.0067, "O": 15.9994, "F": 18.9984032, "Ne": 20.1797, "Na": 22.98976928,
    "Mg": 24.3050, "Al": 26.9815386, "Si": 28.0855, "P": 30.973762, "S": 32.065,
    "Cl": 35.453, "Ar": 39.948, "K": 39.0983, "Ca": 40.078, "Sc": 44.955912, "Ti": 47.867,
    "V": 50.9415, "Cr": 51.9961, "Mn": 54.938045, "Fe": 55.845, "Co": 58.933195,
    "Ni": 58.6934, "Cu": 63.546, "Zn": 65.409, "Ga": 69.723, "Ge": 72.64, "As": 74.92160,
    "Se": 78.96, "Br": 79.904, "Kr": 83.798,
}


def element_of(label: str) -> str:
    """Element symbol of a CP2K kind label such as ``O``, ``H1``, ``Ow`` or ``O_w``.

    CP2K's rule: the element is the label's leading letters, if they form a symbol.
    """
    letters = ""
    for ch in label:
        if ch.isalpha():
            letters += ch
        else:
            break
    for cand in (letters[:2].capitalize(), letters[:1].upper()):
        if cand in CP2K_MASSES_AMU:
            return cand
    raise ValueError(f"cannot tell the element of atom label {label!r}")


def default_mass(label: str) -> float:
    """CP2K's default mass (amu) for an atom label."""
    return CP2K_MASSES_AMU[element_of(label)]


def atomic_number(label: str) -> int:
    return SYMBOLS.index(element_of(label)) + 1
