"""Where every workflow output lives. Rules, the CLI and tests all build paths here.

Patterns keep ``{subject}`` and ``{run_id}`` as Snakemake wildcards; results dir, space and atlas are
formatted in from the config, so changing the atlas names new files (and new jobs) without touching
the fMRIPrep outputs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    results: str
    space: str
    atlas: str

    @classmethod
    def from_config(cls, config: dict) -> "Layout":
        return cls(results=str(config["results_dir"]).rstrip("/"), space=config["space"], atlas=config["atlas"]["name"])

    # -- per run ---------------------------------------------------------------------------------
    def _run_base(self) -> str:
        return f"{self.results}/sub-{{subject}}/func/{{run_id}}_space-{self.space}_seg-{self.atlas}"

    @property
    def timeseries(self) -> str:
        return self._run_base() + "_stat-mean_timeseries.parquet"

    @property
    def timeseries_json(self) -> str:
        return self._run_base() + "_stat-mean_timeseries.json"

    @property
    def pfc(self) -> str:
        return self._run_base() + "_stat-pfc_relmat.parquet"

    @property
    def pfc_json(self) -> str:
        return self._run_base() + "_stat-pfc_relmat.json"

    @property
    def qc_dir(self) -> str:
        return f"{self.results}/sub-{{subject}}/figures/{{run_id}}_space-{self.space}_seg-{self.atlas}"

    # -- once --------------------------------------------------------------------------------------
    @property
    def dataset_description(self) -> str:
        """The BIDS-Derivatives root's description (brainfoundry.derivatives)."""
        return f"{self.results}/dataset_description.json"

    @property
    def run_table(self) -> str:
        return f"{self.results}/bids_index/runs.parquet"

    @property
    def atlas_dseg(self) -> str:
        return f"{self.results}/atlases/seg-{self.atlas}/space-{self.space}_seg-{self.atlas}_dseg.nii.gz"

    @property
    def atlas_labels(self) -> str:
        return f"{self.results}/atlases/seg-{self.atlas}/space-{self.space}_seg-{self.atlas}_dseg.tsv"

    @property
    def atlas_json(self) -> str:
        return f"{self.results}/atlases/seg-{self.atlas}/space-{self.space}_seg-{self.atlas}_dseg.json"

    @property
    def shard_dir(self) -> str:
        return f"{self.results}/shards/{self.atlas}"

    @property
    def bucket_runs(self) -> str:
        return self.shard_dir + "/bucket-{bucket}.runs.parquet"

    @property
    def shard(self) -> str:
        return self.shard_dir + "/bucket-{bucket}.parquet"

    @property
    def manifest(self) -> str:
        return self.shard_dir + "/manifest.parquet"

    @property
    def norm_stats(self) -> str:
        return self.shard_dir + "/norm_stats.parquet"

    def format(self, pattern: str, **wildcards: str) -> str:
        return pattern.format(**wildcards)
