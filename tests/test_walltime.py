"""brainfoundry.walltime: per-step sums of Snakemake benchmark tables."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from brainfoundry.errors import InputError
from brainfoundry.walltime import cli_main, read_benchmarks, summarize

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _bench(path, seconds, rss="100.5", cpu="1.5"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{seconds}\t0:00:01\t{rss}\t200\t90\t95\t0\t0\t50\t{cpu}\n")


def test_sums_jobs_per_step_slowest_first(tmp_path):
    _bench(tmp_path / "pfc" / "sub-1" / "a.tsv", 2.0)
    _bench(tmp_path / "pfc" / "sub-2" / "b.tsv", 3.0, rss="300")
    _bench(tmp_path / "pretrain" / "brainlm.tsv", 10.0, cpu="18")
    _bench(tmp_path / "shards" / "CC200" / "bucket-0.tsv", 1.0, rss="-", cpu="-")
    summary = summarize(read_benchmarks(tmp_path))
    assert list(summary["step"]) == ["pretrain", "pfc", "shards", "all"]
    pfc = summary.set_index("step").loc["pfc"]
    assert (pfc["jobs"], pfc["total_s"], pfc["max_s"], pfc["max_rss_mb"]) == (2, 5.0, 3.0, 300.0)
    assert math.isnan(summary.set_index("step").loc["shards", "max_rss_mb"])  # '-' = not measured
    total = summary.set_index("step").loc["all"]
    assert (total["jobs"], total["total_s"], total["cpu_s"]) == (4, 16.0, 21.0)


def test_cli_writes_the_summary(tmp_path, capsys):
    _bench(tmp_path / "b" / "pretrain" / "lcm.tsv", 4.0)
    assert cli_main([str(tmp_path / "b"), "--out", str(tmp_path / "walltime.tsv")]) == 0
    assert "pretrain" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "walltime.tsv", sep="\t")["total_s"].tolist() == [4.0, 4.0]


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(InputError, match="no such benchmark folder"):
        read_benchmarks(tmp_path / "missing")
    bad = tmp_path / "pfc" / "x.tsv"
    bad.parent.mkdir(parents=True)
    bad.write_text("not\ta\tbenchmark\n1\t2\t3\n")
    with pytest.raises(InputError, match=r"x\.tsv: not a Snakemake benchmark table"):
        read_benchmarks(tmp_path)
