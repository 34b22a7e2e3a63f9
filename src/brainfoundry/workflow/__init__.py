"""Helpers of the rule files, one module per ``workflow/rules/<name>.smk``.

Snakemake imports these while it parses the workflow, and so does every Slurm job (each re-parses
it): nothing here, nor anything it imports, may import torch (``tests/test_workflow_package.py``
plans the demo with a ``torch`` that raises on import). The evaluation's helpers are
:mod:`brainfoundry.evaluate.workflow`.
"""
