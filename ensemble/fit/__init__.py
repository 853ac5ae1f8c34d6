"""Fit: the out-of-core least-squares fit of the agent losses.

``design``   design rows of both kinds over any feature layout (pair + angular invariants).
``gram``     numerics: the dask Gram reduction, ridge solve, errors, selection.
``pipeline`` a trajectory store and a config in, a fitted :class:`ensemble.model.Model` out.
"""

from .design import agent_feature_rows, conservative_feature_rows
from .gram import (SPLITS, GramSet, JointFit, SpeciesFit, Splits, accumulate_gram, agent_design,
                   backward_elimination, columns_for_weights, configuration_splits, conservative_design,
                   conservative_design_blas, fit_joint, fit_species, frame_splits, n_columns, pair_gradients,
                   quadratic_index, relative_rmse, shortest_training_distances, solve_ridge)
from .pipeline import FitConfig, FitError, FitReport, fit_store, format_table, load_fit_config, plot_selection

__all__ = ["SPLITS", "GramSet", "JointFit", "SpeciesFit", "Splits", "accumulate_gram", "agent_design",
           "backward_elimination", "columns_for_weights", "conservative_design", "conservative_design_blas",
           "fit_joint", "fit_species", "frame_splits", "n_columns", "pair_gradients", "quadratic_index",
           "relative_rmse", "solve_ridge", "FitConfig", "FitReport", "fit_store", "format_table",
           "load_fit_config", "plot_selection", "agent_feature_rows", "conservative_feature_rows",
           "configuration_splits", "shortest_training_distances", "FitError"]
