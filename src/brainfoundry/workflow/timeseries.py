"""Helpers of ``workflow/rules/timeseries.smk``: the import options of one run."""

from __future__ import annotations

from brainfoundry.timeseries import import_options

__all__ = ["import_options"]
