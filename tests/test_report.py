"""The report's first page: the headline table (model, strongest baseline, random-init control, n,
intervals), the verdict plot, the landing text per entry point, the learning curve's zero line."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from brainfoundry.evaluate.table import (
    NO_CONTROL,
    NO_INTERVAL,
    format_headline,
    headline_frame,
    plot_verdict,
    tidy,
    verdict,
    what_ran,
    write_headline,
)

REPO = Path(__file__).resolve().parents[1]


def _rows(model: str, *, split="cv", value=0.7, lo=0.65, hi=0.75, n=40, method="probe", task="phenotype",
          target="diagnosis", metric="auc", condition=""):
    row = {"method": method, "target": target, "condition": condition, "split": split, "fold": "all", "seed": -1,
           "metric": metric, "value": value, "ci_low": lo, "ci_high": hi, "n": n}
    return tidy(pd.DataFrame([row]), model, task, model == "baseline")


def _table(*parts):
    return pd.concat(parts, ignore_index=True)


def test_headline_sets_each_model_beside_baseline_and_says_when_no_control_ran(tmp_path):
    table = _table(_rows("brainlm", value=0.62, lo=0.58, hi=0.65, n=40),
                   _rows("baseline", method="fc_linear", value=0.70, lo=0.66, hi=0.74, n=40),
                   _rows("baseline", method="fc_weak", value=0.55, lo=0.50, hi=0.60, n=40))
    frame = headline_frame(table)
    assert len(frame) == 1
    row = frame.iloc[0]
    # the strongest baseline, not the weak one; the model's number with its interval and n
    assert (row["baseline"], row["baseline_value"], row["baseline_n"]) == ("fc_linear", 0.70, 40)
    assert (row["model"], row["model_value"], row["model_interval"]) == ("brainlm [probe]", 0.62, "[0.580, 0.650]")
    assert row["control"] == NO_CONTROL and row["verdict"] == "worse" and row["chance"] == 0.5

    write_headline(table, tmp_path / "headline.html", tmp_path / "headline.tsv",
                   {"entry_point": "timeseries", "data": "series x", "n_runs": 3, "n_subjects": 2,
                    "splits": {"test": {"runs": 1, "subjects": 1}}})
    page = (tmp_path / "headline.html").read_text()
    assert "entry point: timeseries" in page and "3 runs of 2 subjects" in page and NO_CONTROL in page
    assert not list(tmp_path.glob("*.tmp*"))  # written through temp names
    text = format_headline(tmp_path / "headline.tsv")
    assert "brainlm [probe] 0.620 [0.580, 0.650] (n=40)" in text and "fc_linear 0.700" in text
    assert "chance 0.500 -> worse" in text


def test_random_init_control_appears_beside_its_model_not_as_a_model():
    table = _table(_rows("brainlm", value=0.80, lo=0.76, hi=0.84),
                   _rows("brainlm_random_init", value=0.78, lo=0.74, hi=0.82, n=38),
                   _rows("brainlm_random_init", method="other", value=0.90, lo=0.88, hi=0.92),
                   _rows("baseline", method="fc_linear", value=0.70, lo=0.66, hi=0.74))
    ver = verdict(table)
    assert list(ver["model"]) == ["brainlm"]
    # the control's same method (not its best other method), same split
    assert (ver.iloc[0]["control_method"], ver.iloc[0]["control_value"], ver.iloc[0]["control_n"]) == ("probe", 0.78, 38)
    frame = headline_frame(table)
    assert frame.iloc[0]["control"] == "brainlm_random_init [probe]"
    assert frame.iloc[0]["control_interval"] == "[0.740, 0.820]" and frame.iloc[0]["verdict"] == "better"


def test_one_test_subject_gives_no_interval_not_no_clear_difference(tmp_path):
    nan = float("nan")
    kw = {"task": "reconstruction", "target": "", "metric": "r2", "condition": "mask=0.5", "split": "heldout", "n": 1}
    table = _table(_rows("brainlm", method="mae", value=0.30, lo=nan, hi=nan, **kw),
                   _rows("baseline", method="interpolation", value=0.10, lo=nan, hi=nan, **kw))
    frame = headline_frame(table)
    row = frame.iloc[0]
    assert row["verdict"] == NO_INTERVAL
    assert row["model_interval"] == NO_INTERVAL and row["baseline_interval"] == NO_INTERVAL
    assert row["chance"] == 0.0 and row["model_n"] == 1
    plot_verdict(table, tmp_path / "verdict.png")
    assert (tmp_path / "verdict.png").read_bytes()[:4] == b"\x89PNG"


def test_chance_comes_from_the_tasks_own_rows_or_shuffled_labels():
    table = _table(_rows("brainmass", task="networks", target="", metric="balanced_accuracy", method="probe", value=0.4),
                   _rows("baseline", task="networks", target="", metric="balanced_accuracy", method="fc_row", value=0.3),
                   _rows("baseline", task="networks", target="", metric="balanced_accuracy", method="chance",
                         value=1 / 7, lo=float("nan"), hi=float("nan")))
    ver = verdict(table)
    assert math.isclose(ver.iloc[0]["chance"], 1 / 7) and ver.iloc[0]["baseline_method"] == "fc_row"
    mae = _table(_rows("brainlm", metric="mae", target="age", value=5.0, lo=4.5, hi=5.5),
                 _rows("baseline", metric="mae", target="age", value=4.0, lo=3.5, hi=4.5),
                 _rows("baseline", metric="mae", target="age", split="permuted", value=6.0))
    assert verdict(mae).iloc[0]["chance"] == 6.0


def test_what_ran_counts_runs_subjects_and_splits(tmp_path):
    man = pd.DataFrame({"run_id": ["sub-1_run-1", "sub-1_run-2", "sub-2", "sub-3"], "subject": ["1", "1", "2", "3"],
                        "split": ["train", "train", "val", "test"], "site": ["A", "A", "B", "B"]})
    man.to_parquet(tmp_path / "manifest.parquet")
    info = what_ran(tmp_path / "manifest.parquet", "derivatives", "fMRIPrep derivatives d")
    assert (info["n_runs"], info["n_subjects"], info["n_sites"]) == (4, 3, 2)
    assert info["splits"]["train"] == {"runs": 2, "subjects": 1} and info["splits"]["test"]["subjects"] == 1


# -- the landing page ---------------------------------------------------------------------------------------
def _landing(entry: str, files: list, tmp_path: Path) -> str:
    """workflow/report/workflow.rst rendered as Snakemake renders it (Jinja, then docutils)."""
    from docutils.core import publish_parts
    from jinja2 import Environment

    config = {"entry_point": entry, "atlas": {"name": "cc200"}, "space": "MNI152NLin2009cAsym",
              "bids_dir": "bids", "derivatives_dir": "deriv", "timeseries": {"series_dir": "series", "phenotypes": "p.csv"}}
    text = (REPO / "workflow" / "report" / "workflow.rst").read_text()
    rst = Environment(trim_blocks=True, lstrip_blocks=True).from_string(text).render(
        snakemake=SimpleNamespace(config=config), categories={}, files=files)
    return publish_parts(rst, writer="html")["html_body"]


def test_landing_text_matches_the_entry_point_and_lists_only_existing_figures(tmp_path):
    table = _table(_rows("brainlm"), _rows("baseline", method="fc_linear", value=0.6, lo=0.55, hi=0.65))
    plot_verdict(table, tmp_path / "verdict.png")
    write_headline(table, tmp_path / "headline.html", tmp_path / "headline.tsv", {"entry_point": "timeseries"},
                   tmp_path / "verdict.png")
    files = [SimpleNamespace(target=p.name, path=p) for p in (tmp_path / "headline.html", tmp_path / "verdict.png")]

    page = _landing("timeseries", files, tmp_path)
    assert "imported as they were" in page and "did not denoise" in page
    assert "were denoised" not in page and "framewise displacement" not in page
    assert "No per-run QC figures were made" in page
    assert "brainlm [probe]" in page and "no control run" in page  # the headline table itself
    assert '<img alt="verdict"' in page and "data:image/png;base64," in page  # the verdict plot, inlined

    qc = tmp_path / "sub-1_desc-carpet_qc.png"
    qc.write_bytes((tmp_path / "verdict.png").read_bytes())
    page = _landing("derivatives", [*files, SimpleNamespace(target=qc.name, path=qc)], tmp_path)
    assert "were denoised" in page and "deriv" in page and "Per-run QC figures (1 in all)" in page
    page = _landing("raw", [], tmp_path)
    assert "went through fMRIPrep" in page and "No headline yet" in page and "qc.figures" in page


# -- the learning curve's zero line ---------------------------------------------------------------------------
def test_zero_loss_is_the_models_loss_when_it_predicts_zero():
    import torch

    from brainfoundry.models import build_model
    from brainfoundry.train import _zero_loss, sample_seeds

    torch.manual_seed(0)
    model = build_model("brainlm", {"n_parcels": 8, "window": 40, "patch_size": 20, "dim": 16, "depth": 1, "heads": 2,
                                        "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2, "mask_ratio": 0.5,
                                        "future_prob": 0.0}).eval()
    batch = {"x": torch.randn(3, 40, 8) * 2 + 1, "seed": sample_seeds(7, 1, 0, 3)}
    zero = _zero_loss(model, batch)
    model.decode = lambda latent, keep: torch.zeros(3, 8, 2, 20)  # the zero predictor, through the real loss
    with torch.no_grad():
        loss, _ = model.loss(batch)
    assert zero == pytest.approx(float(loss), rel=1e-6) and zero > 1.0
    assert _zero_loss(build_model("brainmass", {"n_parcels": 8, "dim": 16, "depth": 1, "heads": 2, "proj_dim": 8,
                                                    "proj_hidden": 16}), batch) is None


def test_metrics_csv_has_the_zero_line_of_the_same_validation_batches(tmp_path):
    import torch

    from brainfoundry.testing import write_synthetic_shards
    from brainfoundry.train import TrainConfig, train

    torch.set_num_threads(1)
    shards = write_synthetic_shards(tmp_path / "shards")
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, log_every=2, checkpoint_every=4, window=40,
                      eval_batches=1, eval_every=2, threads=1)
    model = {"window": 40, "patch_size": 20, "dim": 16, "depth": 1, "heads": 2, "decoder_dim": 16, "decoder_depth": 1,
                 "decoder_heads": 2, "mask_ratio": 0.5, "future_prob": 0.0}
    train("brainlm", tmp_path / "out", shards=shards, model_config=model, train_config=cfg, resume="never")
    with open(tmp_path / "out" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    zero = [float(r["val_zero_loss"]) for r in rows if r.get("val_zero_loss")]
    assert len(zero) == 2 and all(np.isfinite(zero)) and min(zero) > 0
    # fixed validation crops and masks: the zero predictor scores the same at every evaluation
    assert zero[0] == pytest.approx(zero[1])


def test_the_run_ends_by_printing_the_headline_it_wrote(tmp_path, capsys):
    from brainfoundry.evaluate.table import print_headline

    assert not print_headline(tmp_path / "headline.tsv", tmp_path / "report.html")
    table = _table(_rows("brainlm"), _rows("baseline", method="fc_linear", value=0.6, lo=0.55, hi=0.64))
    write_headline(table, tmp_path / "headline.html", tmp_path / "headline.tsv")
    assert print_headline(tmp_path / "headline.tsv", tmp_path / "report.html")
    out = capsys.readouterr().out
    assert "diagnosis auc: brainlm [probe] 0.700 [0.650, 0.750] (n=40)" in out and "-> better" in out
    assert str(tmp_path / "headline.html") in out and "snakemake --report" in out
    snakefile = (REPO / "Snakefile").read_text()
    assert "onsuccess:" in snakefile and "print_headline" in snakefile


# -- docs/BRING_YOUR_OWN_DATA.md --------------------------------------------------------------------------
def _doc_blocks(kind: str) -> list[str]:
    import re

    text = (REPO / "docs" / "BRING_YOUR_OWN_DATA.md").read_text()
    return re.findall(rf"```{kind}\n(.*?)```", text, flags=re.DOTALL)


def test_the_docs_examples_are_valid_configs():
    import jsonschema
    import yaml

    schema = yaml.safe_load((REPO / "config" / "config.schema.yaml").read_text())
    blocks = [yaml.safe_load(b) for b in _doc_blocks("yaml")]
    assert {b["entry_point"] for b in blocks} == {"raw", "timeseries"}
    for block in blocks:
        jsonschema.validate(block, schema)  # no invented keys: the schema forbids unknown ones


def test_the_docs_timeseries_example_indexes_as_written(tmp_path):
    import yaml

    from brainfoundry.timeseries import index_timeseries

    config = next(b for b in map(yaml.safe_load, _doc_blocks("yaml")) if b["entry_point"] == "timeseries")
    (tmp_path / "phenotypes.csv").write_text(_doc_blocks("text")[0])
    (tmp_path / "series").mkdir()
    for subject in ("1", "2", "3"):
        np.savetxt(tmp_path / "series" / f"sub-{subject}_timeseries.tsv", np.random.default_rng(0).normal(size=(30, 4)),
                   delimiter="\t")
    config["timeseries"].update(series_dir=str(tmp_path / "series"), phenotypes=str(tmp_path / "phenotypes.csv"))
    runs = index_timeseries(config)
    assert list(runs["subject"]) == ["1", "2", "3"] and list(runs["diagnosis"]) == ["control", "patient", "control"]
    assert set(runs["site"]) == {"A", "B"} and (runs["tr"] == 2.0).all()
