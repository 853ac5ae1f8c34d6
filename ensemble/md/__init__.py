"""MD: integrators from small pieces, and one learning-based simulation streamed to zarr.

``integrators`` velocity Verlet, Nosé-Hoover chain, clipping, COM removal (arrays in, arrays out).
``simulate``    initial state (store frame, Maxwell-Boltzmann, tiling), the run loop, output,
                checkpoints and exact resume.
"""

from .integrators import (SUZUKI_YOSHIDA, ChainState, MDState, clip_forces, kinetic_energy, maxwell_boltzmann,
                          nhc_invariant, nose_hoover_chain, remove_com_velocity, temperature, velocity_verlet)
from .simulate import InitialState, SimulationError, SimulationSummary, initial_state, simulate, tile

__all__ = ["SUZUKI_YOSHIDA", "ChainState", "MDState", "clip_forces", "kinetic_energy", "maxwell_boltzmann",
           "nhc_invariant", "nose_hoover_chain", "remove_com_velocity", "temperature", "velocity_verlet",
           "InitialState", "SimulationError", "SimulationSummary", "initial_state", "simulate", "tile"]
