"""The ASE calculator: the same numbers as Model, energy conserved by ASE's own VelocityVerlet,
clear refusals."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms, units
from ase.calculators.calculator import PropertyNotImplementedError
from ase.md.verlet import VelocityVerlet
from numpy.testing import assert_allclose

from conftest import DATA
from ensemble.calculator import EnsembleCalculator
from ensemble.data import load_default
from ensemble.errors import UserError
from ensemble.md import velocity_verlet
from ensemble.model import load_model
from ensemble.units import ASE_VELOCITY_TO_ANGSTROM_PER_FS


def water_atoms(frame=500):
    ds = load_default().isel(frame=frame)
    atoms = Atoms(symbols=[str(s) for s in ds["species"].values], positions=ds["positions"].values,
                  cell=np.diag(np.diag(ds["cell"].values)), pbc=True, masses=ds["masses"].values)
    atoms.set_velocities(ds["velocities"].values / ASE_VELOCITY_TO_ANGSTROM_PER_FS)
    return atoms


def test_energy_and_forces_equal_the_model_and_ase_verlet_conserves_energy():
    model = load_model(DATA / "models" / "conservative-c5.json")
    atoms = water_atoms()
    atoms.calc = EnsembleCalculator(model)
    box = np.diag(atoms.cell)
    species = np.array(atoms.get_chemical_symbols())
    assert_allclose(atoms.get_forces(), model.forces(atoms.positions, box, species), rtol=1e-10, atol=1e-12)
    assert_allclose(atoms.get_potential_energy(), model.energy(atoms.positions, box, species), rtol=1e-12)
    # ASE's VelocityVerlet with our forces: 200 steps of 0.5 fs conserve the total energy (Verlet's
    # fluctuation at this step is ~3e-5 eV/atom) and follow the package's own velocity Verlet
    start = water_atoms()
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    e0 = atoms.get_total_energy()
    energies = []
    dyn.attach(lambda: energies.append(atoms.get_total_energy()), interval=10)
    dyn.run(200)
    assert np.max(np.abs(np.array(energies) - e0)) / len(atoms) < 1e-4
    init, step = velocity_verlet(model.force_fn(box, species), 0.5, start.get_masses())
    state = init(start.positions, start.get_velocities() * ASE_VELOCITY_TO_ANGSTROM_PER_FS)
    for _ in range(200):
        state = step(state)
    assert_allclose(atoms.positions, state.positions, rtol=0, atol=1e-6)   # ASE's CODATA 2014 fs and amu differ ~1e-8
    assert atoms.get_kinetic_energy() > 0


def test_agent_models_give_forces_only_and_bad_systems_are_refused():
    agent = load_model(DATA / "models" / "agent-paper.json")
    atoms = water_atoms(0)
    atoms.calc = EnsembleCalculator(DATA / "models" / "agent-paper.json")
    box = np.diag(atoms.cell)
    assert_allclose(atoms.get_forces(), agent.forces(atoms.positions, box, np.array(atoms.get_chemical_symbols())),
                    rtol=1e-10, atol=1e-12)
    assert EnsembleCalculator(agent).implemented_properties == ["forces"]
    with pytest.raises(PropertyNotImplementedError, match="energy"):
        atoms.get_potential_energy()
    cons = EnsembleCalculator(DATA / "models" / "conservative-c5.json")
    open_box = water_atoms(0)
    open_box.pbc = [True, True, False]
    open_box.calc = cons
    with pytest.raises(UserError, match="periodic box"):
        open_box.get_forces()
    na = Atoms("NaCl", positions=[[0, 0, 0], [2, 0, 0]], cell=[12, 12, 12], pbc=True)
    na.calc = EnsembleCalculator(DATA / "models" / "conservative-c5.json")
    with pytest.raises(UserError, match=r"species \['Cl', 'Na'\] are not in the model"):
        na.get_potential_energy()
