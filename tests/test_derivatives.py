"""results/ as a BIDS-Derivatives dataset: the description the workflow writes, read back by pybids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from brainfoundry import __version__
from brainfoundry.derivatives import dataset_description, write_dataset_description
from brainfoundry.errors import InputError
from conftest import REPO, bin_path


def _demo_config(data: Path) -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["bids_dir"] = str(data / "bids")
    config["derivatives_dir"] = str(data / "derivatives" / "fmriprep")
    config["atlas"]["path"] = str(data / "atlas" / Path(config["atlas"]["path"]).name)
    config["atlas"]["labels"] = str(data / "atlas" / Path(config["atlas"]["labels"]).name)
    return config


def test_description_names_pipeline_version_image_and_source(tmp_path):
    source = tmp_path / "fmriprep"
    source.mkdir()
    (source / "dataset_description.json").write_text(json.dumps({"Name": "x", "DatasetDOI": "doi:10.1/abc"}))
    config = {"entry_point": "derivatives", "derivatives_dir": str(source), "bids": {"dataset_name": "demo"}}
    description = dataset_description(config, "1.2.3", "docker://brainfoundry/brainfoundry-cpu:1.2.3")
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"] == [{
        "Name": "brainfoundry", "Version": "1.2.3",
        "Description": "denoised parcel time series, pseudo-FC views, shards, pretrained models",
        "Container": {"Type": "docker", "Tag": "docker://brainfoundry/brainfoundry-cpu:1.2.3"}}]
    assert description["SourceDatasets"] == [{"URL": source.resolve().as_uri(), "DOI": "doi:10.1/abc"}]
    assert description["Name"] == "demo (brainfoundry derivatives)"

    # The raw entry point ran fMRIPrep too: it is named with its version and image.
    raw = {"entry_point": "raw", "bids_dir": str(tmp_path / "bids"),
           "fmriprep": {"version": "25.2.7", "image": "docker://nipreps/fmriprep:25.2.7"}}
    generated = dataset_description(raw, "1.2.3", "/images/bf.sif")["GeneratedBy"]
    assert generated[0]["Container"] == {"Type": "apptainer", "Tag": "/images/bf.sif"}
    assert generated[1] == {"Name": "fMRIPrep", "Version": "25.2.7",
                            "Container": {"Type": "docker", "Tag": "docker://nipreps/fmriprep:25.2.7"}}


def test_unreadable_source_description_names_the_file(tmp_path):
    (tmp_path / "dataset_description.json").write_text("{not json")
    config = {"entry_point": "derivatives", "derivatives_dir": str(tmp_path)}
    with pytest.raises(InputError) as err:
        write_dataset_description(tmp_path / "out" / "dataset_description.json", config, "1", None)
    assert str(err.value).startswith(f"{tmp_path / 'dataset_description.json'}: not a readable JSON file")
    assert not (tmp_path / "out" / "dataset_description.json").exists()


@pytest.mark.workflow
def test_pybids_reads_the_results_as_a_derivatives_dataset(tmp_path):
    from bids import BIDSLayout

    from brainfoundry.demo import write_demo_dataset

    write_demo_dataset(tmp_path / "demo_data", n_subjects=1, n_volumes=120, two_run_subjects=0)
    config = _demo_config(tmp_path / "demo_data")
    config["qc"]["figures"] = False
    config["atlas"]["cache_dir"] = str(tmp_path / "atlas_cache")
    config["containers"] = {"cpu": "docker://example.org/brainfoundry-cpu:9.9.9"}
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    series = "results/sub-01/func/sub-01_task-rest_run-1_space-MNI152NLin2009cAsym_res-2_seg-Demo100_stat-mean_timeseries.parquet"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = [bin_path("snakemake"), "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(configfile), "--cores", "2", "results/dataset_description.json", series]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]

    results = tmp_path / "results"
    description = json.loads((results / "dataset_description.json").read_text())
    assert description["GeneratedBy"][0]["Version"] == __version__
    assert description["GeneratedBy"][0]["Container"] == {"Type": "docker", "Tag": "docker://example.org/brainfoundry-cpu:9.9.9"}
    assert not list(results.glob(".dataset_description.json.*")), "temporary file left behind"

    layout = BIDSLayout(config["bids_dir"], derivatives=str(results), validate=False)
    derivative = layout.derivatives.get_pipeline("brainfoundry")
    assert derivative.get_dataset_description()["DatasetType"] == "derivative"
    (found,) = derivative.get(subject="01", suffix="timeseries", extension=".parquet", desc=None)
    assert found.path == str(results / series.removeprefix("results/"))
    assert found.get_entities()["task"] == "rest"
    # The same file through the raw layout's view of its derivatives.
    assert [f.path for f in layout.get(subject="01", suffix="timeseries", extension=".parquet", scope="brainfoundry",
                                       desc=None)] == [found.path]

    # Written once: nothing to do on a second look.
    again = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-2000:]
