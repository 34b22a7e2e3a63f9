"""Helpers of ``workflow/rules/common.smk``: the output layout and the run table every rule reads."""

from __future__ import annotations

from brainfoundry.paths import Layout
from brainfoundry.runtable import load_run_table

__all__ = ["Layout", "load_run_table"]
