"""Trajectory input/output: CP2K and ASE readers, the zarr trajectory schema."""

from .cp2k import IngestError, IngestReport, find_cp2k_files, index_xyz, ingest_cp2k, read_ener
from .store import SCHEMA, StoreError, format_summary, open_trajectory, summarize

__all__ = ["IngestError", "IngestReport", "SCHEMA", "StoreError", "find_cp2k_files", "format_summary",
           "index_xyz", "ingest_cp2k", "open_trajectory", "read_ener", "summarize"]
