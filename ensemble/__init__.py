"""ensemble: molecular learning dynamics from ab-initio trajectories, at cluster scale.

The flow is io -> invariants -> fit -> model -> md -> runner -> analysis -> report;
each step lives in the module named after it.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
