"""An ASE calculator for fitted models: use a learned model wherever ASE takes a calculator.

    from ase.io import read
    from ensemble.calculator import EnsembleCalculator

    atoms = read("water.extxyz")                       # periodic, orthorhombic cell
    atoms.calc = EnsembleCalculator("cons.json")
    atoms.get_potential_energy(), atoms.get_forces()   # eV, eV/Å

The conservative kind gives energy and forces (forces = -grad E); the agent kind (the paper's)
gives forces only: its accelerations are not the gradient of any energy, so asking for an
energy raises ``PropertyNotImplementedError``. Neighbours are handled as in
:meth:`ensemble.model.Model.force_fn` (a Verlet list in cutoff mode, all minimum-image pairs in
paper mode); the force function is rebuilt when the cell, the atoms or the periodicity change.
Units are ASE's: Å, eV (the package's own).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from .errors import UserError
from .invariants import orthorhombic_box
from .model import Model, load_model

__all__ = ["EnsembleCalculator"]


class EnsembleCalculator(Calculator):
    """ASE calculator of an ``ensemble`` model (a :class:`~ensemble.model.Model` or a model JSON path)."""

    def __init__(self, model: Model | str | Path, *, skin_angstrom: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.model = model if isinstance(model, Model) else load_model(model)
        self.implemented_properties = (["energy", "free_energy", "forces"] if self.model.kind == "conservative"
                                       else ["forces"])
        self.skin_angstrom = float(skin_angstrom)
        self._fn = None

    def _force_fn(self, atoms):
        if not all(atoms.pbc):
            raise UserError(f"EnsembleCalculator: the model needs a periodic box in x, y and z; atoms.pbc is "
                            f"{list(map(bool, atoms.pbc))}")
        try:
            box = orthorhombic_box(np.asarray(atoms.cell), "atoms.cell")
        except ValueError as exc:
            raise UserError(f"EnsembleCalculator: {exc}") from None
        species = np.array(atoms.get_chemical_symbols(), dtype=object)
        unknown = sorted(set(species) - set(self.model.species))
        if unknown:
            raise UserError(f"EnsembleCalculator: species {unknown} are not in the model's {list(self.model.species)}")
        return self.model.force_fn(box, species, skin_angstrom=self.skin_angstrom)

    def calculate(self, atoms=None, properties=("forces",), system_changes=all_changes):
        for p in properties:
            if p not in self.implemented_properties:
                raise PropertyNotImplementedError(
                    f"{p!r}: a model of kind {self.model.kind!r} gives {self.implemented_properties} "
                    "(agent forces are not the gradient of an energy)")
        super().calculate(atoms, properties, system_changes)
        if self._fn is None or {"cell", "numbers", "pbc"} & set(system_changes):
            self._fn = self._force_fn(self.atoms)
        forces, energy = self._fn(np.asarray(self.atoms.positions, dtype=float))
        self.results["forces"] = np.asarray(forces, dtype=float)
        if self.model.kind == "conservative":
            self.results["energy"] = float(energy)
            self.results["free_energy"] = float(energy)
