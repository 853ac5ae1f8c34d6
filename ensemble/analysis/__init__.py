"""Analyses of a trajectory store (reference or learned), lazily with dask over frames.

One file per concern, kernels and wrappers together per concern, the pipeline on top:

``topology``   per-frame bonding (each H to its nearest O; H2O / H3O+ / OH- / free H), proton
               transfers with a dwell time, ion lifetimes (numba kernel)
``geometry``   temperatures per species, weighted per-frame statistics, angle from distances
``rdf``        g(r) per frame and species pair (numba kernel), areas between g(r), first peaks
``spectra``    windowed O-H bond power spectrum (paper Fig. 6) and VDOS, peaks, resolution
``stability``  three named failure criteria: blow-up, dissociation, structure drift
``store``      :func:`analyze` (one statistics Dataset, declared merges), merge, frame
               selection, write / open
``scalars``    time averages with block-average errors (:func:`run_scalars`)
``members``    aggregation across ensemble members

Real DFT water is reactive: nothing follows the molecules of frame 0. Bonds, angles and
ions come from each frame's own topology; proton transfer is a rate, not a failure.
"""

from ..units import SPEED_OF_LIGHT_CM_PER_FS
from .geometry import angle_from_distances, kinetic, species_temperature, weighted_frame_stats
from .members import aggregate_members
from .rdf import first_peak, rdf, rdf_area, rdf_counts_kernel, species_pairs
from .scalars import Scalar, block_average, run_scalars
from .spectra import (H_BEND_BAND, H_STRETCH_BAND, OH_STRETCH_BAND, SPECTRUM_MAX_WAVENUMBER, frame_interval,
                      oh_spectrum, peak_position, power_spectrum, spectral_peak, vdos)
from .stability import CRITERIA, Criterion, StabilityConfig, stability, structure_windows
from .store import (ANGLE_EDGES, BOND_EDGES, MERGE, STATS_SCHEMA, analyze, histogram, merge, open_stats,
                    select_frames, split_frame_range, stats_summary_json, write_stats)
from .topology import (BOND_MAX_ANGSTROM, DWELL_FS, AnalysisError, ProtonTransfers, committed_owners,
                       ion_lifetimes, proton_transfers, static_box, topology, topology_frames, water_indices)

__all__ = ["SPEED_OF_LIGHT_CM_PER_FS", "angle_from_distances", "kinetic", "species_temperature",
           "weighted_frame_stats", "aggregate_members", "first_peak", "rdf", "rdf_area", "rdf_counts_kernel",
           "species_pairs", "Scalar", "block_average", "run_scalars", "H_BEND_BAND", "H_STRETCH_BAND",
           "OH_STRETCH_BAND", "SPECTRUM_MAX_WAVENUMBER", "frame_interval", "oh_spectrum", "peak_position",
           "power_spectrum", "spectral_peak", "vdos", "CRITERIA", "Criterion", "StabilityConfig", "stability",
           "structure_windows", "ANGLE_EDGES", "BOND_EDGES", "MERGE", "STATS_SCHEMA", "analyze", "histogram", "merge",
           "open_stats", "select_frames", "split_frame_range", "stats_summary_json", "write_stats", "BOND_MAX_ANGSTROM", "DWELL_FS",
           "AnalysisError", "ProtonTransfers", "committed_owners", "ion_lifetimes", "proton_transfers", "static_box",
           "topology", "topology_frames", "water_indices"]
