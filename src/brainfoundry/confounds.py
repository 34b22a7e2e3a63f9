"""Confound regressors and the volumes to keep for one run, from fMRIPrep's confounds TSV.

The selection itself is nilearn's (:func:`nilearn.interfaces.fmriprep.load_confounds`), driven by the
``denoise`` config section, so a run denoised here is denoised exactly as nilearn users expect:

- ``strategy``: any of motion, wm_csf, global_signal, compcor, ica_aroma, high_pass, scrub,
  non_steady_state; ``motion``/``wm_csf``/``global_signal`` pick 6/12/24-style expansions,
  ``compcor``/``n_compcor`` the CompCor variant, ``fd_threshold``/``std_dvars_threshold``/
  ``scrub_min_segment`` the scrubbing.
- ``non_steady_state`` in the strategy drops the volumes fMRIPrep flagged
  (``non_steady_state_outlier_XX``); without it they are kept (nilearn always drops them, so we hide
  those columns from it).

nilearn finds the confounds file next to a BOLD file by name; the run table gives us the file
directly, so it is staged (linked, or copied when we add a column) under fMRIPrep's naming in a
temporary directory. Where fMRIPrep did not provide framewise displacement, it is computed from the
``trans_*``/``rot_*`` columns with nipype's ``FramewiseDisplacement`` (Power et al. 2012, 50 mm head
radius). fMRIPrep's motion columns are translations in mm then rotations in radians, which is
nipype's ``parameter_source="SPM"`` layout (``"FSL"`` would expect rotations first).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from brainfoundry.errors import ConfigError, InputError

MOTION_COLUMNS = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
NONSTEADY_PREFIX = "non_steady_state_outlier"


@dataclass
class RunConfounds:
    """What denoising needs from the confounds file, for a BOLD series of ``n_volumes`` volumes."""

    regressors: pd.DataFrame | None  # one row per BOLD volume (all of them); None with no strategy
    sample_mask: np.ndarray  # indices of the kept volumes (after non-steady-state drop and scrubbing)
    fd: np.ndarray  # framewise displacement per volume (mm; NaN for the first)
    fd_source: str  # "fmriprep" or "nipype"
    nonsteady: np.ndarray  # volumes flagged non-steady-state (dropped only if configured)
    censored: np.ndarray  # volumes removed by scrubbing (not counting non-steady-state drops)
    n_volumes: int
    columns: list[str] = field(default_factory=list)

    @property
    def n_nonsteady_dropped(self) -> int:
        return int(np.setdiff1d(self.nonsteady, self.sample_mask).size)


def read_confounds_table(path: str | os.PathLike) -> pd.DataFrame:
    """fMRIPrep's confounds TSV (``n/a`` as NaN), with a clear error for unreadable files."""
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"])
    except FileNotFoundError as err:
        raise InputError(path, "confounds file not found") from err
    except (OSError, pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise InputError(path, f"cannot read confounds TSV: {err}") from err
    if table.shape[1] < 2:
        raise InputError(path, "confounds TSV has fewer than two columns; is it tab-separated?")
    for column in table.columns:
        if pd.api.types.is_numeric_dtype(table[column]):
            continue
        # fMRIPrep writes numbers and n/a only; nilearn would fail later on this column without the file.
        values = table[column]
        bad = pd.to_numeric(values, errors="coerce").isna() & values.notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(path, f"column '{column}', row {row + 1} (line {row + 2}): {values.iloc[row]!r} "
                                   "is not a number (confounds must be numbers or n/a)")
        table[column] = pd.to_numeric(values)
    return table


def framewise_displacement(motion: np.ndarray, radius: float = 50.0) -> np.ndarray:
    """Power et al. FD of fMRIPrep-ordered motion parameters (T x 6), computed by nipype.

    Returns T values; the first is NaN (no previous volume), as in fMRIPrep's TSV.
    """
    os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network
    from nipype.algorithms.confounds import FramewiseDisplacement

    motion = np.asarray(motion, dtype=float)
    if motion.ndim != 2 or motion.shape[1] != 6:
        raise ValueError(f"motion parameters must be T x 6, got {motion.shape}")
    if len(motion) < 2:
        return np.full(len(motion), np.nan)
    with tempfile.TemporaryDirectory(prefix="bf_fd_") as tmp:
        par = Path(tmp) / "motion.par"
        np.savetxt(par, motion)
        node = FramewiseDisplacement(in_file=str(par), parameter_source="SPM", radius=radius,
                                     out_file=str(Path(tmp) / "fd.txt"))
        result = node.run(cwd=tmp)
        fd = np.atleast_1d(np.loadtxt(result.outputs.out_file, skiprows=1))
    return np.concatenate([[np.nan], fd])


def nonsteady_volumes(table: pd.DataFrame) -> np.ndarray:
    cols = [c for c in table.columns if c.startswith(NONSTEADY_PREFIX)]
    if not cols:
        return np.array([], dtype=int)
    return np.flatnonzero(table[cols].fillna(0).to_numpy().sum(axis=1) > 0)


def _check_denoise(denoise: Mapping[str, Any]) -> list[str]:
    strategy = list(denoise.get("strategy", []))
    if "global_signal" in strategy and not denoise.get("global_signal"):
        raise ConfigError("denoise.global_signal", "must be set (basic/power2/derivatives/full) when "
                                                   "'global_signal' is in denoise.strategy")
    if "scrub" in strategy and denoise.get("fd_threshold") is None and denoise.get("std_dvars_threshold") is None:
        raise ConfigError("denoise.fd_threshold", "scrubbing needs fd_threshold and/or std_dvars_threshold")
    if "compcor" in strategy and "high_pass" not in strategy:
        raise ConfigError("denoise.strategy", "compcor needs high_pass in the strategy (fMRIPrep's CompCor "
                                              "components are computed on high-pass filtered data)")
    return strategy


def load_run_confounds(confounds_tsv: str | os.PathLike, denoise: Mapping[str, Any], n_volumes: int,
                       confounds_json: str | os.PathLike | None = None) -> RunConfounds:
    """Regressors and kept volumes for one run, through nilearn's ``load_confounds``.

    Parameters
    ----------
    confounds_tsv : path
        fMRIPrep ``desc-confounds_timeseries.tsv``.
    denoise : mapping
        The ``denoise`` config section.
    n_volumes : int
        Number of volumes of the BOLD series; the TSV must have one row per volume.
    confounds_json : path, optional
        Its JSON sidecar (needed for anatomical CompCor); defaults to the TSV's ``.json`` sibling.

    Raises
    ------
    InputError
        Unreadable TSV, a row count that differs from the BOLD's, or confounds the strategy needs
        that the file lacks.
    """
    from nilearn.interfaces.fmriprep import load_confounds

    strategy = _check_denoise(denoise)
    tsv = Path(confounds_tsv)
    table = read_confounds_table(tsv)
    if len(table) != n_volumes:
        raise InputError(tsv, f"has {len(table)} rows but the BOLD series has {n_volumes} volumes")

    changed = False
    fd_source = "fmriprep"
    if "framewise_displacement" not in table.columns or table["framewise_displacement"].isna().all():
        missing = [c for c in MOTION_COLUMNS if c not in table.columns]
        if missing:
            if "scrub" in strategy and denoise.get("fd_threshold") is not None:
                raise InputError(tsv, f"no framewise_displacement column and no motion columns {missing} to compute it")
            fd = np.full(n_volumes, np.nan)
        else:
            fd = framewise_displacement(table[list(MOTION_COLUMNS)].to_numpy())
            table["framewise_displacement"] = fd
            fd_source, changed = "nipype", True
    fd = table["framewise_displacement"].to_numpy(dtype=float) if "framewise_displacement" in table else fd

    nonsteady = nonsteady_volumes(table)
    drop_nonsteady = "non_steady_state" in strategy
    if not drop_nonsteady and nonsteady.size:
        # nilearn always drops flagged volumes; hiding the flags keeps them, as configured.
        table = table.drop(columns=[c for c in table.columns if c.startswith(NONSTEADY_PREFIX)])
        changed = True
    std_dvars_threshold = denoise.get("std_dvars_threshold")
    if "scrub" in strategy:
        if std_dvars_threshold is None:
            std_dvars_threshold = np.inf  # DVARS scrubbing off: nothing exceeds infinity
            if "std_dvars" not in table.columns:
                table["std_dvars"] = np.nan
                changed = True
        elif "std_dvars" not in table.columns:
            raise InputError(tsv, "std_dvars_threshold is set but the file has no std_dvars column")
    fd_threshold = denoise.get("fd_threshold")

    json_path = Path(confounds_json) if confounds_json else tsv.with_suffix(".json")
    nilearn_strategy = [s for s in strategy if s != "non_steady_state"]
    kwargs = dict(strategy=nilearn_strategy, motion=denoise.get("motion", "full"),
                  wm_csf=denoise.get("wm_csf", "basic"), global_signal=denoise.get("global_signal") or "basic",
                  compcor=denoise.get("compcor", "anat_combined"), n_compcor=denoise.get("n_compcor", "all"),
                  scrub=int(denoise.get("scrub_min_segment", 5)),
                  fd_threshold=np.inf if fd_threshold is None else float(fd_threshold),
                  std_dvars_threshold=std_dvars_threshold if std_dvars_threshold is not None else np.inf,
                  demean=True)
    with tempfile.TemporaryDirectory(prefix="bf_confounds_") as tmp:
        # fMRIPrep naming so nilearn pairs the (notional) image with our confounds file.
        staged = Path(tmp) / "sub-0_task-x_desc-confounds_timeseries.tsv"
        if changed:
            table.to_csv(staged, sep="\t", index=False, na_rep="n/a")
        else:
            os.symlink(tsv.resolve(), staged)
        if json_path.exists():
            os.symlink(json_path.resolve(), staged.with_suffix(".json"))
        fake_bold = str(Path(tmp) / "sub-0_task-x_space-X_desc-preproc_bold.nii.gz")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.filterwarnings("ignore", message="Non-steady state volumes are always detected")
                regressors, sample_mask = load_confounds(fake_bold, **kwargs)
        except (ValueError, KeyError) as err:  # nilearn: ValueError, or KeyError when some columns of a set lack
            problem = err.args[0] if isinstance(err, KeyError) and err.args else err
            raise InputError(tsv, f"cannot build the configured confounds (missing columns?): {problem}") from err

    kept = np.arange(n_volumes) if sample_mask is None else np.asarray(sample_mask, dtype=int)
    dropped = np.setdiff1d(np.arange(n_volumes), kept)
    censored = np.setdiff1d(dropped, nonsteady) if drop_nonsteady else dropped
    if regressors is not None and regressors.shape[1] == 0:
        regressors = None
    return RunConfounds(regressors=regressors, sample_mask=kept, fd=np.asarray(fd, dtype=float), fd_source=fd_source,
                        nonsteady=nonsteady, censored=censored, n_volumes=n_volumes,
                        columns=[] if regressors is None else list(regressors.columns))
