"""Fit: the out-of-core least-squares fit of the agent losses.

``gram``     numerics: design rows, the dask Gram reduction, ridge solve, errors, selection.
``pipeline`` a trajectory store and a config in, a fitted :class:`ensemble.model.Model` out.
"""

from .gram import (SPLITS, GramSet, JointFit, SpeciesFit, Splits, accumulate_gram, agent_design,
                   backward_elimination, columns_for_weights, conservative_design, conservative_design_blas,
                   fit_joint, fit_species, frame_splits, n_columns, pair_gradients, quadratic_index,
                   relative_rmse, solve_ridge)
from .pipeline import FitConfig, FitReport, fit_store, format_table, load_fit_config, plot_selection

__all__ = ["SPLITS", "GramSet", "JointFit", "SpeciesFit", "Splits", "accumulate_gram", "agent_design",
           "backward_elimination", "columns_for_weights", "conservative_design", "conservative_design_blas",
           "fit_joint", "fit_species", "frame_splits", "n_columns", "pair_gradients", "quadratic_index",
           "relative_rmse", "solve_ridge", "FitConfig", "FitReport", "fit_store", "format_table",
           "load_fit_config", "plot_selection"]
