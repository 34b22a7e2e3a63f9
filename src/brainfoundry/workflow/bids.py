"""Helpers of ``workflow/rules/bids.smk``: the run table file and the BIDS-Derivatives description."""

from __future__ import annotations

from brainfoundry import __version__
from brainfoundry.bids import table_hash
from brainfoundry.derivatives import (
           dataset_description,
           source_description,
           write_dataset_description,
)
from brainfoundry.runtable import write_run_table

__all__ = ["__version__", "dataset_description", "source_description", "table_hash", "write_dataset_description",
           "write_run_table"]
