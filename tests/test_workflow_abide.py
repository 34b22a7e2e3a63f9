"""A few real ABIDE PCP subjects through the real Snakemake workflow (timeseries entry point -> pFC -> shards).

Runs ``snakemake --snakefile <repo>/Snakefile --directory <tmp>`` with config/abide.yaml restricted to
three files (two sites, one with an all-zero ROI), so it reads ../shared/data and skips without it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from brainfoundry import pfc
from conftest import abide_subset_config, bin_path

pytestmark = [pytest.mark.workflow, pytest.mark.shared_data]

FILES = ["Caltech_0051456", "Caltech_0051459", "OHSU_0050142"]  # Caltech_0051456 has one all-zero ROI
N_VIEWS = 4
MANIFEST = "results/shards/CC200/manifest.parquet"


def _config(data: dict[str, Path], files: list[str]) -> dict:
    config = abide_subset_config(data, files)
    config["pfc"]["n_views"] = N_VIEWS
    config["shards"]["n_buckets"] = 2
    return config


def _snakemake(repo_root: Path, workdir: Path, config: dict, *extra: str) -> subprocess.CompletedProcess:
    config_file = workdir / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    cmd = [bin_path("snakemake"), "--snakefile", str(repo_root / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(config_file), "--cores", "2", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def _run_files(file_id: str) -> tuple[str, str]:
    """The time-series and pFC parquet of one ABIDE file's run, relative to the workdir."""
    sub = file_id.split("_")[-1]
    base = f"results/sub-{sub}/func/sub-{sub}_task-rest_space-MNI152NLin6Asym_res-3_seg-CC200"
    return f"{base}_stat-mean_timeseries.parquet", f"{base}_stat-pfc_relmat.parquet"


def _targets(repo_root: Path, files: list[str]) -> list[str]:
    """The per-run outputs, plus the manifest when the shard rules are part of the workflow."""
    targets = [path for file_id in files for path in _run_files(file_id)]
    if _with_shards(repo_root):
        targets.append(MANIFEST)
    return targets


def _with_shards(repo_root: Path) -> bool:
    return (repo_root / "workflow" / "rules" / "shards.smk").exists()


def test_abide_subjects_run_through_the_workflow(repo_root, abide_data, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    config = _config(abide_data, FILES)
    targets = _targets(repo_root, FILES)
    done = _snakemake(repo_root, workdir, config, *targets)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]

    # the time series: 200 CC200 columns named by the atlas labels, site TR, zero-variance ROI flagged
    labels = workdir / "results/atlases/seg-CC200/space-MNI152NLin6Asym_res-3_seg-CC200_dseg.tsv"
    names = [line.split("\t")[1] for line in labels.read_text().splitlines()[1:]]
    assert len(names) == 200
    trs = {"Caltech_0051456": 2.0, "Caltech_0051459": 2.0, "OHSU_0050142": 2.5}
    for file_id in FILES:
        ts_path, pfc_path = (workdir / p for p in _run_files(file_id))
        series = pq.read_table(ts_path)
        assert series.column_names == names
        meta = json.loads(ts_path.with_suffix(".json").read_text())
        assert Path(meta["SourceFile"]).name == f"{file_id}_rois_cc200.1D.gz"
        assert meta["RepetitionTime"] == trs[file_id] and meta["NumberOfVolumes"] == series.num_rows
        assert (len(meta["QC"]["zero_variance_parcels"]) > 0) == (file_id == "Caltech_0051456")
        assert meta["QC"]["mean_fd"] is not None  # func_mean_fd from the phenotype table

        # pFC views: finite, and each regenerates from its stored seed. The job ran with one BLAS
        # thread, this process may use more, so values agree to float16 rounding, not bit for bit.
        views = pq.read_table(pfc_path).to_pydict()
        assert views["view"] == list(range(N_VIEWS))
        x = np.column_stack([c.to_numpy() for c in series.columns])
        for seed, n_kept, values in zip(views["seed"], views["n_kept"], views["pfc"]):
            stored = np.asarray(values, dtype=np.float16)
            assert np.isfinite(stored).all() and n_kept == len(pfc.keep_indices(len(x), seed, 0.8))
            again = pfc.regenerate_view(x, seed, 0.8, fisher_z=True)
            np.testing.assert_allclose(stored.astype(np.float32), again, rtol=2**-10, atol=1e-6)

    if _with_shards(repo_root):
        manifest = pq.read_table(workdir / MANIFEST).to_pandas()
        assert len(manifest) == len(FILES)
        assert {"subject", "split", "bucket"} <= set(manifest.columns)

    # Nothing to redo; adding a subject runs only that subject's per-run jobs.
    again = _snakemake(repo_root, workdir, config, "--dry-run", *targets)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stdout[-2000:]
    bigger = _config(abide_data, [*FILES, "OHSU_0050143"])
    plan = _snakemake(repo_root, workdir, bigger, "--dry-run",
                      *_targets(repo_root, [*FILES, "OHSU_0050143"]))
    assert plan.returncode == 0, plan.stderr[-3000:]
    counts = _job_counts(plan.stdout + plan.stderr)
    assert counts.get("import_timeseries") == 1 and counts.get("pfc") == 1, counts
    assert "atlas_prepare" not in counts, counts
    if _with_shards(repo_root):  # only the new subject's bucket is rewritten
        assert counts.get("shard") == 1, counts


def _job_counts(text: str) -> dict[str, int]:
    """Rule -> job count from Snakemake's dry-run job-stats table."""
    counts = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0].isidentifier() and parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts
