"""Physical constants and unit conversions: the one place they live.

Inside the package every quantity is in Å, fs, amu, eV and K. Readers convert
once at the edge with the factors below; names carry the units they convert.

Package constants are CODATA 2018. CP2K output is converted with CP2K's OWN
constants, so converted numbers are exactly what CP2K meant: CP2K 2023.1 (the
Debian package) uses CODATA 2006 and prints its factors at ``PRINT_LEVEL MEDIUM``
("Fundamental physical constants"); the ``CP2K_*`` values below are copied from
that printout. The two sets differ by ~1e-7 relative at most (Hartree in eV),
~1e-6 for k_B.
"""

from __future__ import annotations

# CODATA 2018
BOHR_ANGSTROM = 0.529177210903  #: Bohr radius in Å
HARTREE_EV = 27.211386245988  #: Hartree energy in eV
AU_TIME_FS = 2.4188843265857e-2  #: atomic unit of time (hbar / E_h) in fs
AMU_KG = 1.66053906660e-27  #: atomic mass constant in kg
EV_J = 1.602176634e-19  #: electron volt in J
BOLTZMANN_EV_K = 8.617333262e-5  #: k_B in eV/K

# CP2K 2023.1's own factors (CODATA 2006), as printed in its output
CP2K_BOHR_ANGSTROM = 0.529177208590  #: [a.u.] = [Bohr] -> [Angstrom]
CP2K_AU_TIME_FS = 2.41888432650478e-2  #: [a.u.] -> [fs]
CP2K_HARTREE_EV = 27.2113838565563  #: [a.u.] -> [eV]
CP2K_AMU_ELECTRON_MASSES = 1822.88848426455  #: [u] -> [a.u.]
CP2K_HARTREE_K = 3.15774647902944e5  #: [a.u.] -> [K]

#: CP2K velocities (bohr / atomic time unit) -> Å/fs
BOHR_PER_AU_TIME_TO_ANGSTROM_PER_FS = CP2K_BOHR_ANGSTROM / CP2K_AU_TIME_FS
#: CP2K forces (hartree / bohr) -> eV/Å
HARTREE_PER_BOHR_TO_EV_PER_ANGSTROM = CP2K_HARTREE_EV / CP2K_BOHR_ANGSTROM
#: CP2K energies (hartree) -> eV
CP2K_HARTREE_TO_EV = CP2K_HARTREE_EV
#: kinetic energy: amu * (Å/fs)^2 -> eV  (about 103.6427)
AMU_A2_PER_FS2_TO_EV = AMU_KG * 1e-20 / 1e-30 / EV_J
#: acceleration: (eV/Å) / amu -> Å/fs^2  (about 9.6485e-3)
EV_PER_ANGSTROM_AMU_TO_ANGSTROM_PER_FS2 = 1.0 / AMU_A2_PER_FS2_TO_EV
#: ASE's velocity unit (Å per ASE time unit) -> Å/fs; ASE time unit = Å sqrt(amu/eV)
ASE_VELOCITY_TO_ANGSTROM_PER_FS = AMU_A2_PER_FS2_TO_EV**-0.5

#: Avogadro constant (for densities in g/cm^3)
AVOGADRO = 6.02214076e23

#: speed of light in cm/fs: wavenumber (cm^-1) = frequency (1/fs) / c
SPEED_OF_LIGHT_CM_PER_FS = 2.99792458e-5
