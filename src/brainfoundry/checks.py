"""Start-up checks: what would fail an hour into a run, said before any job starts.

The Snakefile calls, in order,

- :func:`check_config` right after loading the config: schema errors in a few lines naming the key
  and the nearest valid keys (instead of Snakemake's message followed by the whole schema);
- :func:`check_atlas`: the atlas keys the entry point needs (``atlas.path`` / ``atlas.url`` /
  ``atlas.labels``), files that do not exist, and parcel centroids for the families that need them;
- :func:`check_run_table` once the run table is built: zero runs (after ``on_missing_file: skip``),
  evaluation targets and LCM variables that no phenotype column provides (errors), and empty
  train/val/test splits (a warning: a partial run of one or two subjects is legitimate).

The ``timeseries`` index (``brainfoundry.timeseries.index_timeseries``) calls
:func:`check_region_counts` and :func:`short_series` on the series' shapes (read cheaply from headers).
Each problem is a :class:`~brainfoundry.errors.ConfigError` or ``InputError`` (Snakemake prints the
message and the line of the Snakefile, no traceback) or a logged warning. No torch here: Snakemake
imports this while parsing.
"""

from __future__ import annotations

import difflib
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from brainfoundry.errors import ConfigError, InputError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


# -- the schema ---------------------------------------------------------------------------------------
def _key(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _schema_at(schema: Mapping[str, Any], path: Iterable[Any]) -> Mapping[str, Any]:
    """The sub-schema of a config path (object properties only; enough for key suggestions)."""
    node = schema
    for part in path:
        props = node.get("properties") or {}
        if part in props:
            node = props[part]
        elif isinstance(node.get("additionalProperties"), Mapping):
            node = node["additionalProperties"]
        else:
            return {}
    return node


def schema_errors(config: Mapping[str, Any], schema: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(dotted key, problem)`` for each schema error of the config (empty when it validates).

    For an unknown key the problem names the nearest valid keys at that level (``difflib``), or lists
    them when none is near.
    """
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    found = []
    for err in sorted(validator.iter_errors(dict(config)), key=lambda e: (list(map(str, e.absolute_path)), e.message)):
        where = list(err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, Mapping):
            allowed = sorted((_schema_at(schema, where).get("properties") or {}).keys())
            for name in sorted(set(err.instance) - set(allowed)):
                near = difflib.get_close_matches(str(name), allowed, n=3, cutoff=0.5)
                found.append((_key(where + [name]), "unknown key; " + (f"did you mean {', '.join(near)}?" if near
                              else f"valid keys here: {', '.join(allowed)}")))
        elif err.validator == "enum":
            found.append((_key(where), f"{err.instance!r} is not one of {err.validator_value}"))
        else:
            found.append((_key(where), err.message if len(err.message) < 200 else err.message[:200] + " ..."))
    return found


def check_config(config: Mapping[str, Any], schema_path: str | Path, limit: int = 3) -> None:
    """Validate the config against ``config/config.schema.yaml``: a ConfigError of a few lines naming
    the key (and at most ``limit`` errors) instead of Snakemake's message followed by the whole schema.

    Snakemake's ``validate`` still runs after this (it fills the schema's ``default:`` values).
    """
    import yaml

    # libyaml's loader when built (several times faster; every snakemake process, every Slurm job, parses this).
    schema = yaml.load(Path(schema_path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    found = schema_errors(config, schema)
    if found:
        (key, problem), rest = found[0], found[1:limit]
        lines = [problem] + [f"config key '{k}': {p}" for k, p in rest]
        if len(found) > limit:
            lines.append(f"... and {len(found) - limit} more")
        lines.append(f"(the keys and their meaning: {schema_path})")
        raise ConfigError(key, "\n".join(lines))


# -- the atlas ----------------------------------------------------------------------------------------
def families_needing_centroids(config: Mapping[str, Any]) -> list[str]:
    """Configured pretraining families whose spatial embedding uses parcel centroids (``coords``).

    ``model.spatial_embedding: learned`` (BrainLM, BrainMass) needs none; the LCM and SC-MBM have no such setting.
    """
    from brainfoundry.models import (
        make_config,  # imports the family's module (torch): only reached without centroids
    )
    from brainfoundry.train_settings import resolve_settings
    from brainfoundry.workflow.pretrain import workflow_settings

    needing = []
    for family in (config.get("pretrain") or {}).get("families") or []:
        model, _ = resolve_settings(family, workflow_settings(config, family))
        cfg = make_config(family, {k: v for k, v in model.items() if k != "n_parcels"})
        # Families without the setting (the LCM's FC-row tokens, SC-MBM's fixed parcel order) use no centroids.
        if getattr(cfg, "spatial_embedding", None) == "coords":
            needing.append(family)
    return needing


def check_atlas(config: Mapping[str, Any]) -> None:
    """The atlas keys the entry point needs, and the files they name, before anything runs.

    - ``raw``/``derivatives`` parcellate images: ``atlas.path`` or ``atlas.url`` (+ ``sha256``);
    - ``timeseries``: series are already parcellated, so ``atlas.labels`` alone is enough (an image
      is optional). Without coordinates in the labels (and no image to compute centroids from), the
      families with ``spatial_embedding: coords`` cannot run: ConfigError naming them.
    """
    entry = config.get("entry_point")
    atlas = dict(config.get("atlas") or {})
    path, url, labels = atlas.get("path"), atlas.get("url"), atlas.get("labels")
    if path and url:
        raise ConfigError("atlas.path", "set either atlas.path or atlas.url, not both (the other to null)")
    if labels and not Path(labels).is_file():
        raise ConfigError("atlas.labels", f"labels file not found: {labels}")
    if path and not Path(path).is_file():
        hint = (" (series already parcellated: set atlas.path: null and give atlas.labels, a TSV "
                "index, name[, x, y, z, network])") if entry == "timeseries" else ""
        raise ConfigError("atlas.path", f"atlas image not found: {path}{hint}")
    if url and not atlas.get("sha256"):
        raise ConfigError("atlas.sha256", f"atlas.url {url} needs its sha256 (64 lowercase hex digits)")
    if entry != "timeseries":
        if not (path or url):
            raise ConfigError("atlas.path", f"the {entry} entry point parcellates images: set atlas.path to a "
                                            "NIfTI label image, or atlas.url and atlas.sha256")
        return
    if not (path or url or labels):
        raise ConfigError("atlas.labels", "the timeseries entry point needs the parcels: set atlas.labels "
                                          "(TSV with columns index, name[, x, y, z, network], one row per "
                                          "series column) or an atlas image (atlas.path / atlas.url)")
    if path or url:
        return
    from brainfoundry.atlas import read_labels_table

    table = read_labels_table(labels)
    if table[["x", "y", "z"]].isna().any(axis=None):
        needing = families_needing_centroids(config)
        if needing:
            raise ConfigError("atlas.labels", f"{labels} has no x, y, z centroids (and there is no atlas image), "
                              f"but {needing} use them (spatial_embedding: coords). Add x, y, z columns (MNI mm), "
                              "set atlas.path to the label image, or set "
                              + ", ".join(f"pretrain.{f}.model.spatial_embedding: "
                                          "learned" for f in needing))


# -- the series' shapes (timeseries entry point) ---------------------------------------------------------
def model_window(config: Mapping[str, Any]) -> tuple[int | None, str]:
    """The training window and the key it comes from (``pretrain.trainer.window``, else ``shards.window``)."""
    trainer = dict((config.get("pretrain") or {}).get("trainer") or {})
    if trainer.get("window"):
        return int(trainer["window"]), "pretrain.trainer.window"
    window = (config.get("shards") or {}).get("window")
    return (int(window), "shards.window") if window else (None, "shards.window")


def check_region_counts(shapes: Mapping[str, tuple[int, int]], files: Mapping[str, str],
                        config: Mapping[str, Any]) -> None:
    """Every series has the same number of parcel columns, and as many as ``atlas.labels`` rows."""
    if not shapes:
        return
    counts = Counter(n for _, n in shapes.values())
    labels = (config.get("atlas") or {}).get("labels")
    if labels and not (config.get("atlas") or {}).get("path") and not (config.get("atlas") or {}).get("url"):
        from brainfoundry.atlas import read_labels_table

        expected, source = len(read_labels_table(labels)), f"atlas.labels ({labels})"
    else:
        expected, source = counts.most_common(1)[0][0], "most files"
    odd = {r: n for r, (_, n) in shapes.items() if n != expected}
    if odd:
        listed = "; ".join(f"{files[r]}: {n}" for r, n in sorted(odd.items())[:5])
        raise InputError(files[min(odd)], f"{len(odd)} of {len(shapes)} series have another number of "
                         f"parcel columns than {source} ({expected}): {listed}"
                         f"{' ...' if len(odd) > 5 else ''}; every run of one atlas must have the same parcels "
                         "(leave such files out with timeseries.exclude_subjects)")


def short_series(shapes: Mapping[str, tuple[int, int]], files: Mapping[str, str], config: Mapping[str, Any],
                 policy: str) -> list[str]:
    """Runs with fewer volumes than the model window. ``policy`` (``timeseries.short_series``):
    ``skip`` returns them (the caller leaves them out; a warning names them), ``error`` raises, ``keep``
    only warns (they reach the shards; training and evaluation leave them out by length)."""
    window, key = model_window(config)
    if window is None:
        return []
    short = sorted(r for r, (n_t, _) in shapes.items() if n_t < window)
    if not short:
        return []
    listed = ", ".join(f"{r} ({shapes[r][0]})" for r in short[:10]) + (" ..." if len(short) > 10 else "")
    if policy == "error":
        raise InputError(files[short[0]], f"{len(short)} of {len(shapes)} series are shorter than the model "
                         f"window ({key} = {window} volumes): {listed}; lower {key} or set "
                         "timeseries.short_series: skip")
    done = "kept (timeseries.short_series: keep)" if policy == "keep" else "left out (timeseries.short_series: skip)"
    log.warning("%d of %d series are shorter than the model window (%s = %d volumes) and are %s: %s",
                len(short), len(shapes), key, window, done, listed)
    return [] if policy == "keep" else short


# -- the run table ------------------------------------------------------------------------------------------
def _provided(runs, name: str) -> bool:
    return name in runs.columns and bool(runs[name].notna().any())


def check_run_table(config: Mapping[str, Any], runs) -> None:
    """Zero runs and phenotypes nobody provides: ConfigError before the DAG is built; empty splits: a warning."""
    entry = config.get("entry_point")
    if len(runs) == 0:
        dropped = list(runs.attrs.get("dropped") or [])
        if entry == "timeseries":
            reasons = Counter(d["reason"].split(":")[0] for d in dropped)
            first = f"; first: {dropped[0]['reason']}" if dropped else ""
            raise ConfigError("timeseries.series_dir", f"no runs left to process: {len(dropped)} phenotype rows "
                              f"were left out ({', '.join(f'{n} {r}' for r, n in reasons.items()) or 'none listed'})"
                              f"{first}. Check timeseries.series_dir and timeseries.file_pattern "
                              "(timeseries.on_missing_file: skip leaves out rows without a file)")
        key = "bids_dir" if entry == "raw" else "derivatives_dir"
        raise ConfigError(key, f"no runs found for the {entry} entry point (bids.include_subjects, bids.tasks "
                               "and the other bids filters apply)")

    per_subject = runs.groupby("subject")["split"].first()
    counts = {name: int((per_subject == name).sum()) for name in SPLITS}
    ratios = dict((config.get("shards") or {}).get("split_ratios") or {})
    heldout = (config.get("evaluate") or {}).get("heldout_split", "test")
    # A split is needed when training uses it (train, val with a positive ratio) or evaluation scores it.
    needed = [n for n in SPLITS if n in ("train", heldout) or float(ratios.get(n, 1.0)) > 0]
    empty = [name for name in needed if counts[name] == 0]
    if empty:
        # A warning, not an error: partial runs (the series or the shards of one or two subjects) are fine.
        told = ", ".join(f"{n} {counts[n]}" for n in SPLITS)
        log.warning("config key 'shards.split_ratios': the %s split%s empty (subjects: %s of %d; ratios %s): "
                    "pretraining needs train and val subjects and the evaluation scores nothing without a "
                    "held-out split. With 3 or more subjects set shards.fill_empty_splits: true, or raise the "
                    "empty split's ratio",
                    "/".join(empty), "s are" if len(empty) > 1 else " is", told, len(per_subject),
                    ratios or "default")

    families = list((config.get("pretrain") or {}).get("families") or [])
    if "lcm" in families:
        env = [e.get("name") for e in (((config.get("pretrain") or {}).get("lcm") or {}).get("model") or {})
               .get("env") or [] if isinstance(e, Mapping)]
        missing = [name for name in env if not _provided(runs, name)]
        if not env or missing:
            raise ConfigError("pretrain.lcm.model.env", (f"variables {missing} are not phenotype columns of the "
                              "run table" if env else "no environment variables") + f" (columns: "
                              f"{_phenotype_columns(runs)}); the LCM needs at least one: list provided columns "
                              "there, or leave lcm out of pretrain.families")

    from brainfoundry.evaluate.settings import (
        EvalSettings,  # the evaluation's defaults live there
    )

    ev = EvalSettings.from_dict(config.get("evaluate") or {})
    models = list((config.get("evaluate") or {}).get("models") or families)
    wanted: dict[str, list[str]] = {}
    if "phenotype" in ev.tasks:
        wanted["evaluate.targets"] = list(ev.targets)
        if "lcm" in models:
            wanted["evaluate.pseudo_label_targets"] = list(ev.pseudo_label_targets)
    if "finetune" in ev.tasks and ev.finetune.enabled:
        wanted["evaluate.finetune.targets"] = list(ev.finetune.targets)
    for key, names in wanted.items():
        missing = [name for name in names if not _provided(runs, name)]
        if missing:
            raise ConfigError(key, f"targets {missing} are not phenotype columns of the run table (columns: "
                              f"{_phenotype_columns(runs)}); map them (timeseries.columns / extra_columns, "
                              f"bids.participants_columns) or set {key}: [] (or leave the task out of "
                              "evaluate.tasks)")


_CONTRACT = {"subject", "session", "task", "run", "dataset", "site", "tr", "bucket", "split", "bold", "mask",
             "confounds", "raw_bold", "timeseries_file", "timeseries_format", "file_id", "n_volumes"}


def _phenotype_columns(runs) -> list[str]:
    return [c for c in runs.columns if c not in _CONTRACT and runs[c].notna().any()]
