"""Denoise one run and average it within atlas parcels: the same numbers as nilearn, streamed.

``NiftiLabelsMasker(labels_img, mask_img).fit_transform(bold, confounds, sample_mask)`` loads the
whole 4D image (gunzip, then a float copy), averages each volume within each label, then cleans the
small T x N matrix with :func:`nilearn.signal.clean`. Here the image is streamed instead: gzip is
decompressed by ISA-L (``isal.igzip``, which releases the GIL) in a background thread, straight into
a few reused one-volume buffers, while this thread turns each chunk of volumes into parcel sums, so the run costs about one decompression
and never holds more than a few volumes. Parcel means are exactly nilearn's (``scipy.ndimage.mean``
semantics): voxels whose label is non-zero and whose mask value is non-zero, summed in float64 in
the same voxel order, divided by the voxel count, and cast to float32 for float32 images. Labels
without voxels (lost in resampling or outside the mask) give all-zero columns, as in nilearn. The
cleaning is the call nilearn makes (:func:`nilearn.signal.clean`, same arguments), except that the
Butterworth filter runs vectorised in float64 (``butterworth__copy=True``) instead of column by
column in float32, so results agree to float32 rounding (a test checks relative error <= 1e-5).

Optional resampling to ``target_tr`` happens after cleaning: each uncensored segment of kept volumes
is interpolated with a cubic spline (``scipy.interpolate.CubicSpline``) at the times ``k * target_tr``
that fall inside it; nothing is interpolated across censored gaps. Anti-aliasing is the band-pass's
job: when downsampling, set ``low_pass`` below the new Nyquist frequency (a warning says so otherwise).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import queue
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import nibabel as nib
import numpy as np

from brainfoundry.atlas import Grid, read_volume
from brainfoundry.confounds import RunConfounds, load_run_confounds
from brainfoundry.errors import InputError
from brainfoundry.io import provenance, sha256_file
from brainfoundry.runfiles import read_labels, write_series

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
# Decompressed bytes handed over per step, rounded down to whole volumes (at least one): one 2 mm
# MNI volume (4 MiB) is still in cache when it is averaged; 16 MiB chunks cost ~15 % more CPU.
CHUNK_BYTES = 4 << 20
READ_AHEAD = 16  # chunks decompressed ahead of the parcel averaging, made only as needed


# -- reading the BOLD header and data ---------------------------------------------------------------

@dataclass(frozen=True)
class NiftiInfo:
    """Where the voxels of a single-file NIfTI are and how to read them."""

    path: str
    shape: tuple[int, ...]
    affine: np.ndarray
    dtype: np.dtype  # on-disk dtype with byte order
    slope: float | None
    inter: float | None
    vox_offset: int
    zooms: tuple[float, ...]
    compressed: bool

    @property
    def n_volumes(self) -> int:
        return int(self.shape[3]) if len(self.shape) > 3 else 1

    @property
    def volume_bytes(self) -> int:
        return int(np.prod(self.shape[:3])) * self.dtype.itemsize


def _is_gzip(path: str | os.PathLike) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == GZIP_MAGIC


def _open_stream(path: str | os.PathLike):
    """A binary stream of the decompressed file (ISA-L).

    Not ``igzip_threaded``: its queue of freshly allocated blocks adds a copy and page faults
    (~15 % more CPU than decompressing straight into the reader's buffers from its own thread).
    """
    from isal import igzip

    if not _is_gzip(path):
        return open(path, "rb"), False
    return igzip.open(path, "rb"), True


def _corrupt(path, err: Exception) -> InputError:
    return InputError(path, f"corrupt or truncated image data ({type(err).__name__}: {err})")


# Exceptions a damaged gzip stream raises in stdlib gzip / zlib / ISA-L.
def _gzip_errors() -> tuple[type[BaseException], ...]:
    from isal import isal_zlib

    return (OSError, EOFError, zlib.error, isal_zlib.error, gzip.BadGzipFile)


def _parse_header(path, raw: bytes, compressed: bool) -> NiftiInfo:
    if len(raw) < 348:
        raise InputError(path, f"file too short for a NIfTI header ({len(raw)} bytes)")
    size_le = int.from_bytes(raw[:4], "little")
    size_be = int.from_bytes(raw[:4], "big")
    klass = nib.Nifti2Header if 540 in (size_le, size_be) else nib.Nifti1Header
    if klass is nib.Nifti2Header and len(raw) < 540:
        raise InputError(path, "file too short for a NIfTI-2 header")
    try:
        hdr = klass(binaryblock=raw[: klass.template_dtype.itemsize], check=True)
    except Exception as err:  # nibabel raises HeaderDataError and friends
        raise InputError(path, f"not a valid NIfTI header: {err}") from err
    magic = bytes(hdr["magic"]).split(b"\x00")[0]
    if magic not in (b"n+1", b"n+2"):
        raise InputError(path, f"not a single-file NIfTI (magic {magic!r})")
    if hdr.get_data_dtype().kind not in "iuf":
        raise InputError(path, f"unsupported voxel type {hdr.get_data_dtype()} (expected integers or floats)")
    size = klass.template_dtype.itemsize
    vox_offset = int(hdr["vox_offset"])
    if vox_offset < size + 4:  # 0 in some writers means "right after the header" (as nibabel reads it)
        vox_offset = size + 4
    slope, inter = hdr.get_slope_inter()
    return NiftiInfo(path=os.fspath(path), shape=tuple(int(s) for s in hdr.get_data_shape()),
                     affine=np.asarray(hdr.get_best_affine(), dtype=float), dtype=hdr.get_data_dtype(),
                     slope=None if slope is None else float(slope), inter=None if inter is None else float(inter),
                     vox_offset=vox_offset, zooms=tuple(float(z) for z in hdr.get_zooms()),
                     compressed=compressed)


def read_nifti_info(path: str | os.PathLike) -> NiftiInfo:
    """Parse a NIfTI(-1/-2) header (gzipped or not) with nibabel, reading only its first bytes."""
    if not Path(path).exists():
        raise InputError(path, "file not found")
    stream, compressed = _open_stream(path)
    try:
        with stream:
            raw = stream.read(540)
    except _gzip_errors() as err:
        raise _corrupt(path, err) from err
    return _parse_header(path, raw, compressed)


def check_bold_info(info: NiftiInfo, grid: Grid | None = None, atlas_path: str | None = None) -> None:
    """A 4D series of at least two volumes, on ``grid`` when given."""
    if len(info.shape) != 4 or info.shape[3] < 1:
        raise InputError(info.path, f"expected a 4D BOLD series, got a {len(info.shape)}D image of shape {info.shape}")
    if grid is not None and not grid.matches(info.shape, info.affine):
        raise InputError(info.path, f"BOLD grid (shape {info.shape[:3]}, affine "
                                    f"{np.array2string(info.affine[:3], precision=3, separator=',')}) differs from "
                                    f"the prepared atlas grid ({grid.describe()}) of {atlas_path}; "
                                    "the atlas is resampled once per configured space, so this run is not in that space "
                                    "(check config 'space' / atlas.reference_img)")


# -- parcel index ----------------------------------------------------------------------------------

@dataclass
class ParcelIndex:
    """Voxels of each parcel in the order nilearn sums them, for sums by ``np.add.reduceat``.

    ``voxels`` are flat indices into a volume in NIfTI (Fortran) order, grouped by column and, within
    a column, sorted like ``numpy.bincount`` visits them in nilearn (C order of the 3D array).
    """

    voxels: np.ndarray  # int64 flat F-order indices
    starts: np.ndarray  # start of each non-empty column's run in ``voxels``
    nonempty: np.ndarray  # column numbers with at least one voxel
    counts: np.ndarray  # voxels per column (all columns)
    n_columns: int
    shape: tuple[int, int, int]

    @classmethod
    def build(cls, labels: np.ndarray, values: np.ndarray, mask: np.ndarray | None = None) -> "ParcelIndex":
        """Index for label ``values`` (one column each, in that order) of a 3D ``labels`` array."""
        labels = np.asarray(labels)
        shape = tuple(int(s) for s in labels.shape)
        values = np.asarray(values, dtype=np.int64)
        if values.size and (values.min() <= 0 or len(np.unique(values)) != len(values)):
            raise ValueError("parcel label values must be unique positive integers")
        # Output column of each label value (-1: background or a value not in the table).
        column = np.full(int(max(labels.max(initial=0), values.max(initial=0))) + 1, -1, dtype=np.int64)
        column[values] = np.arange(len(values))
        lab = np.ravel(labels, order="C")  # nilearn's bincount visits voxels in C order
        use = lab > 0
        if mask is not None:
            use &= np.ravel(np.asarray(mask), order="C").astype(bool, copy=False)
        c_index = np.flatnonzero(use)
        cols = column[lab[c_index]]
        keep = cols >= 0
        c_index, cols = c_index[keep], cols[keep]
        order = np.argsort(cols, kind="stable")  # stable: C order kept within each column
        c_index, cols = c_index[order], cols[order]
        f_index = np.ravel_multi_index(np.unravel_index(c_index, shape, order="C"), shape, order="F")
        counts = np.bincount(cols, minlength=len(values)).astype(np.int64)
        nonempty = np.flatnonzero(counts)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[nonempty]
        return cls(voxels=f_index.astype(np.int64), starts=starts.astype(np.int64), nonempty=nonempty,
                   counts=counts, n_columns=len(values), shape=shape)

    def sums(self, volumes: np.ndarray) -> np.ndarray:
        """Float64 parcel sums of ``volumes`` (k x V, flat F order) -> k x n_columns."""
        out = np.zeros((volumes.shape[0], self.n_columns))
        if self.voxels.size:
            # float64 before summing, like bincount in scipy.ndimage.mean (casting first is faster
            # than reduceat's own casting, and gives the same sums).
            picked = np.take(volumes, self.voxels, axis=1).astype(np.float64)
            out[:, self.nonempty] = np.add.reduceat(picked, self.starts, axis=1)
        return out


# -- streaming parcel means -------------------------------------------------------------------------

@dataclass
class StreamResult:
    means: np.ndarray  # T x N (float32 for float32 images, else float64), uncleaned
    info: NiftiInfo
    sha256: str | None


def _readinto_full(stream, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return got


_END = object()


class VolumeReader:
    """The volumes of a 4D NIfTI, decompressed ahead of use in background threads.

    A background thread decompresses with ISA-L (without the GIL) straight into a small pool of
    reused buffers of whole volumes, so decompression runs ahead while the caller is busy
    (preparing the atlas, averaging the previous chunk). Iterating yields ``(first volume, k x V
    array)`` views of a buffer that is reused once the loop moves on. Optionally the file's sha256 is
    computed in a second thread (provenance without a second pass afterwards).
    """

    def __init__(self, info: NiftiInfo, *, chunk_bytes: int = CHUNK_BYTES, depth: int = READ_AHEAD,
                 checksum: bool = False):
        self.info = info
        self.per_chunk = max(1, chunk_bytes // info.volume_bytes)
        # Buffers are made by the reader thread only when none is free (up to ``depth``): allocating
        # and zero-filling all of them up front cost ~0.25 s before decompression could start, and
        # a consumer that keeps up needs only two or three.
        self._free: queue.Queue = queue.Queue()
        self._depth, self._made = max(2, depth), 0
        self._filled: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._hashed: dict[str, Any] = {}
        self._hasher = None
        if checksum:
            self._hasher = threading.Thread(target=self._hash, name="sha256", daemon=True)
            self._hasher.start()
        self._thread = threading.Thread(target=self._read, name="nifti-reader", daemon=True)
        self._thread.start()

    def _hash(self) -> None:
        try:
            self._hashed["sha256"] = sha256_file(self.info.path)
        except OSError as err:
            self._hashed["error"] = err

    def _take_free(self):
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        if self._made < self._depth:
            self._made += 1
            # np.empty: pages are touched first by the decompressor, not zero-filled here as well.
            return memoryview(np.empty(self.per_chunk * self.info.volume_bytes, dtype=np.uint8)).cast("B")
        while not self._stop.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def _read(self) -> None:
        info, path = self.info, self.info.path
        try:
            stream, _ = _open_stream(path)
            with stream:
                skip = info.vox_offset
                while skip > 0:  # header + extensions
                    piece = stream.read(min(skip, 1 << 20))
                    if not piece:
                        raise InputError(path, "file ends inside the NIfTI header/extensions")
                    skip -= len(piece)
                n_vol = info.n_volumes
                for start in range(0, n_vol, self.per_chunk):
                    buffer = self._take_free()
                    if buffer is None:
                        return
                    k = min(self.per_chunk, n_vol - start)
                    got = _readinto_full(stream, memoryview(buffer)[: k * info.volume_bytes])
                    if got < k * info.volume_bytes:
                        have = start * info.volume_bytes + got
                        raise InputError(path, f"truncated image data: header promises {n_vol} volumes "
                                               f"({n_vol * info.volume_bytes} bytes of voxels), file has {have}")
                    self._filled.put((start, k, buffer))
                while stream.read(1 << 20):  # to the end: the gzip reader verifies CRC and length there
                    if self._stop.is_set():
                        return
            self._filled.put(_END)
        except InputError as err:
            self._filled.put(err)
        except _gzip_errors() as err:
            self._filled.put(_corrupt(path, err))
        except BaseException as err:  # anything else: hand it to the consumer rather than lose it
            self._filled.put(err)

    def __iter__(self):
        info = self.info
        n_vox = int(np.prod(info.shape[:3]))
        native = info.dtype.newbyteorder("=")
        while True:
            item = self._filled.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            start, k, buffer = item
            volumes = np.frombuffer(buffer, dtype=info.dtype, count=k * n_vox).reshape(k, n_vox)
            if not info.dtype.isnative:
                volumes = volumes.astype(native)
            yield start, volumes
            del volumes
            self._free.put(buffer)

    def sha256(self) -> str | None:
        if self._hasher is None:
            return None
        self._hasher.join()
        if "error" in self._hashed:
            raise InputError(self.info.path, f"cannot read for checksum: {self._hashed['error']}")
        return self._hashed["sha256"]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def __enter__(self) -> "VolumeReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parcel_means(reader: VolumeReader, index: ParcelIndex, *, names: list[str] | None = None,
                 abort: Callable[[], bool] | None = None) -> np.ndarray:
    """Parcel means (T x N) of every volume the reader yields; float32 for unscaled float32 images.

    ``abort`` is checked between chunks; when it returns True the loop stops early (the caller found
    a problem elsewhere, e.g. in the confounds) and the result is incomplete.
    """
    info = reader.info
    if info.shape[:3] != index.shape:
        raise InputError(info.path, f"image grid {info.shape[:3]} differs from the parcel index grid {index.shape}")
    scaled = info.slope not in (None, 1.0) or info.inter not in (None, 0.0)
    out_dtype = np.float32 if (info.dtype.newbyteorder("=") == np.float32 and not scaled) else np.float64
    means = np.zeros((info.n_volumes, index.n_columns), dtype=out_dtype)
    counts = np.where(index.counts > 0, index.counts, 1).astype(np.float64)
    for start, volumes in reader:
        k = len(volumes)
        sums = index.sums(volumes)
        if not np.all(np.isfinite(sums)):
            bad_t, bad_c = np.nonzero(~np.isfinite(sums))
            where = [names[c] if names else int(c) for c in np.unique(bad_c)[:5]]
            raise InputError(info.path, f"NaN/inf voxel values inside parcels {where} (first at volume "
                                        f"{start + int(bad_t.min())}); fix the preprocessing or mask those voxels out")
        block = sums / counts  # exactly scipy.ndimage.mean's float64 sum / count
        if scaled:  # the mean of slope * x + inter
            block = block * (1.0 if info.slope is None else info.slope) + (info.inter or 0.0)
            block[:, index.counts == 0] = 0.0
        means[start:start + k] = block
        if abort is not None and abort():
            break
    return means


def stream_parcel_means(bold: str | os.PathLike, index: ParcelIndex, *, info: NiftiInfo | None = None,
                        chunk_bytes: int = CHUNK_BYTES, checksum: bool = True,
                        names: list[str] | None = None) -> StreamResult:
    """Parcel means of every volume of a 4D NIfTI, streaming a few volumes at a time.

    Parameters
    ----------
    bold : path
        ``.nii`` or ``.nii.gz`` (gzip detected from the bytes, not the name).
    index : ParcelIndex
        Voxels per output column on the image's grid.
    info : NiftiInfo, optional
        The parsed header (read here when absent).
    chunk_bytes : int
        Decompressed bytes per step (rounded to whole volumes).
    checksum : bool
        Also compute the file's sha256 (for provenance) in a parallel thread.
    names : list of str, optional
        Column names, for error messages.

    Raises
    ------
    InputError
        Corrupt/truncated gzip or data, not 4D, or NaN/inf values inside a parcel.
    """
    info = info or read_nifti_info(bold)
    check_bold_info(info)
    with VolumeReader(info, chunk_bytes=chunk_bytes, checksum=checksum) as reader:
        means = parcel_means(reader, index, names=names)
        digest = reader.sha256()
    return StreamResult(means=means, info=info, sha256=digest)


# -- cleaning and resampling ------------------------------------------------------------------------

def clean_kwargs(denoise: Mapping[str, Any], tr: float) -> dict[str, Any]:
    """The arguments of ``nilearn.signal.clean`` (and of ``NiftiLabelsMasker``) for a config."""
    return dict(detrend=bool(denoise.get("detrend", True)), standardize=denoise.get("standardize", False),
                standardize_confounds=True, t_r=float(tr), low_pass=denoise.get("low_pass"),
                high_pass=denoise.get("high_pass"))


def clean_parcel_series(raw: np.ndarray, confounds: RunConfounds, tr: float,
                        denoise: Mapping[str, Any]) -> np.ndarray:
    """Kept volumes of ``raw`` (T x N), cleaned exactly as NiftiLabelsMasker cleans them."""
    from nilearn.signal import clean

    from threadpoolctl import threadpool_limits

    kwargs = clean_kwargs(denoise, tr)
    # nilearn's default filters column by column, in place in float32 (to save memory on voxel
    # data); on a T x N matrix one vectorised float64 pass is ~8x faster and rounds less. The
    # results differ from the masker's by float32 rounding (~1e-7 relative; a test bounds it at 1e-5).
    kwargs["butterworth__copy"] = True
    sample_mask = None if len(confounds.sample_mask) == confounds.n_volumes else confounds.sample_mask
    # T x N is small: BLAS threads only add start-up and contention cost here (same results).
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", DeprecationWarning)
        # nilearn 0.12 announces its 0.13 default for censored edges; the sidecar records the version.
        warnings.filterwarnings("ignore", message="By default the cubic spline interpolator", category=FutureWarning)
        return clean(raw, confounds=confounds.regressors, sample_mask=sample_mask, runs=None, **kwargs)


def resample_series(series: np.ndarray, kept: np.ndarray, tr: float, target_tr: float) -> tuple[np.ndarray, np.ndarray]:
    """Resample kept volumes (rows of ``series`` at times ``kept * tr``) onto times ``k * target_tr``.

    Each run of consecutive kept volumes is interpolated on its own (cubic spline); target times
    inside censored gaps are skipped. Returns the new series (float32) and its times in seconds.
    """
    from scipy.interpolate import CubicSpline

    kept = np.asarray(kept)
    times = kept * float(tr)
    breaks = np.flatnonzero(np.diff(kept) > 1) + 1
    out_rows, out_times = [], []
    for seg in np.split(np.arange(len(kept)), breaks):
        if len(seg) < 2:
            continue
        t0, t1 = times[seg[0]], times[seg[-1]]
        grid = np.arange(np.ceil(t0 / target_tr - 1e-9), np.floor(t1 / target_tr + 1e-9) + 1) * target_tr
        if not len(grid):
            continue
        spline = CubicSpline(times[seg], series[seg].astype(np.float64), axis=0)
        out_rows.append(spline(grid))
        out_times.append(grid)
    if not out_rows:
        return np.empty((0, series.shape[1]), np.float32), np.empty(0)
    return np.concatenate(out_rows).astype(np.float32), np.concatenate(out_times)


def tsnr(raw_kept: np.ndarray) -> np.ndarray:
    """Temporal SNR (mean / sd over time) per column; NaN where sd is 0."""
    raw_kept = np.asarray(raw_kept, dtype=np.float64)
    mean, sd = raw_kept.mean(axis=0), raw_kept.std(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sd > 0, mean / sd, np.nan)


# -- one run ----------------------------------------------------------------------------------------

@dataclass
class ParcellationResult:
    cleaned: np.ndarray  # rows x N float32
    raw: np.ndarray  # T x N uncleaned means, all volumes
    times: np.ndarray  # seconds of each cleaned row from the first volume
    confounds: RunConfounds
    tr: float  # of the cleaned rows
    native_tr: float
    tsnr: np.ndarray
    names: list[str]
    empty: list[str]
    zero_variance: list[str]
    bold_sha256: str | None


def atlas_grid(atlas_dseg: str | os.PathLike) -> Grid:
    """The grid of the prepared atlas image (header only)."""
    try:
        return Grid.of(nib.load(os.fspath(atlas_dseg)))
    except Exception as err:
        raise InputError(atlas_dseg, f"cannot read prepared atlas: {err}") from err


def load_atlas_for_grid(atlas_dseg: str | os.PathLike, atlas_labels: str | os.PathLike):
    """The prepared (resampled) atlas labels array, its labels table and its grid."""
    try:
        img = nib.load(os.fspath(atlas_dseg))
        labels = np.asanyarray(img.dataobj)
    except Exception as err:
        raise InputError(atlas_dseg, f"cannot read prepared atlas: {err}") from err
    labels = labels.astype(np.int32, copy=False) if labels.dtype.kind in "iu" else np.rint(labels).astype(np.int32)
    table = read_labels(atlas_labels)
    return labels, table, Grid.of(img)


def load_mask(mask_path: str | os.PathLike, grid: Grid) -> np.ndarray:
    """A brain mask on ``grid`` as booleans (non-zero = in), as nilearn's maskers read it."""
    img, data = read_volume(mask_path, "brain mask", "a brain mask must be 3D")
    if not grid.matches(data.shape, img.affine):
        raise InputError(mask_path, f"mask grid (shape {data.shape}) differs from the BOLD/atlas grid ({grid.describe()})")
    mask = (data != 0) if data.dtype.kind in "iub" else (np.nan_to_num(data) != 0)
    if not mask.any():
        raise InputError(mask_path, "brain mask is empty")
    return mask


def parcellate_run(bold: str | os.PathLike, atlas_dseg: str | os.PathLike, atlas_labels: str | os.PathLike, *,
                   confounds_tsv: str | os.PathLike, tr: float, denoise: Mapping[str, Any],
                   mask: str | os.PathLike | None = None, confounds_json: str | os.PathLike | None = None,
                   checksum: bool = True) -> ParcellationResult:
    """Denoised parcel time series of one run (nothing written; see :func:`write_outputs`).

    Cheap checks come first (header, grid, volume count); then decompression starts in the
    background and the atlas, mask and confounds are read while it runs.
    """
    info = read_nifti_info(bold)
    check_bold_info(info, atlas_grid(atlas_dseg), os.fspath(atlas_dseg))
    min_volumes = int(denoise.get("min_volumes", 2))
    if info.n_volumes < min_volumes:
        raise InputError(bold, f"has {info.n_volumes} volumes, fewer than the minimum of {min_volumes} (denoise.min_volumes)")
    header_tr = info.zooms[3] if len(info.zooms) > 3 else 0.0
    if header_tr and abs(header_tr - tr) > 0.01 * tr:
        log.warning("%s: header TR %.3f s differs from the run table's %.3f s; using %.3f s", bold, header_tr, tr, tr)
    with VolumeReader(info, checksum=checksum) as reader:
        # Confounds in a helper thread: that work overlaps the decompression too.
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="confounds")
        pending = pool.submit(load_run_confounds, confounds_tsv, denoise, info.n_volumes, confounds_json)
        pool.shutdown(wait=False)
        labels, table, grid = load_atlas_for_grid(atlas_dseg, atlas_labels)
        names = table["name"].tolist()
        mask_data = load_mask(mask, grid) if mask else None
        index = ParcelIndex.build(labels, table["index"].to_numpy(), mask_data)
        raw = parcel_means(reader, index, names=names,
                           abort=lambda: pending.done() and pending.exception() is not None)
        conf = pending.result()  # raises the confounds error, if any
        digest = reader.sha256()
    if len(conf.sample_mask) < min_volumes:
        raise InputError(bold, f"only {len(conf.sample_mask)} of {info.n_volumes} volumes remain after dropping "
                               f"{conf.n_nonsteady_dropped} non-steady-state and censoring {len(conf.censored)} "
                               f"(FD > {denoise.get('fd_threshold')}); the minimum is {min_volumes} (denoise.min_volumes)")
    cleaned = np.asarray(clean_parcel_series(raw, conf, tr, denoise), dtype=np.float32)
    times = conf.sample_mask * float(tr)
    out_tr = float(tr)
    target_tr = denoise.get("target_tr")
    if target_tr and abs(float(target_tr) - tr) > 1e-9:
        low = denoise.get("low_pass")
        if float(target_tr) > tr and (low is None or low >= 0.5 / float(target_tr)):
            log.warning("resampling TR %.3f -> %.3f s without a low-pass below the new Nyquist %.3f Hz may alias",
                        tr, target_tr, 0.5 / float(target_tr))
        cleaned, times = resample_series(cleaned, conf.sample_mask, tr, float(target_tr))
        out_tr = float(target_tr)
        if len(cleaned) < min_volumes:
            raise InputError(bold, f"only {len(cleaned)} samples after resampling to TR {target_tr} s; "
                                   f"the minimum is {min_volumes}")
    raw_kept = raw[conf.sample_mask]
    empty = [n for n, c in zip(names, index.counts) if c == 0]
    zero_var = [n for n, col in zip(names, cleaned.T) if not np.ptp(col) > 0]
    return ParcellationResult(cleaned=cleaned, raw=raw, times=times, confounds=conf, tr=out_tr, native_tr=float(tr),
                              tsnr=tsnr(raw_kept), names=names, empty=empty, zero_variance=zero_var,
                              bold_sha256=digest)


def write_outputs(result: ParcellationResult, *, out: str | os.PathLike, out_json: str | os.PathLike,
                  out_raw: str | os.PathLike | None, inputs: Mapping[str, str | os.PathLike | None],
                  config: Mapping[str, Any], atlas: str, space: str) -> None:
    """Parquet + sidecar (and the raw means for QC) through ``runfiles.write_series``."""
    conf = result.confounds
    fd = conf.fd
    kept_fd = fd[conf.sample_mask]
    qc = {
        "mean_fd": float(np.nanmean(fd)) if np.isfinite(fd).any() else None,
        "mean_fd_kept": float(np.nanmean(kept_fd)) if np.isfinite(kept_fd).any() else None,
        "fd_source": conf.fd_source,
        "n_censored": int(len(conf.censored)),
        "fraction_censored": float(len(conf.censored) / conf.n_volumes),
        "n_nonsteady_dropped": conf.n_nonsteady_dropped,
        "tsnr": [None if not np.isfinite(v) else round(float(v), 4) for v in result.tsnr],
        "tsnr_median": float(np.nanmedian(result.tsnr)) if np.isfinite(result.tsnr).any() else None,
        "empty_parcels": result.empty,
        "zero_variance_parcels": result.zero_variance,
    }
    bold = inputs["bold"]
    small_inputs = [p for key, p in inputs.items() if p and key != "bold"]
    prov = provenance(small_inputs, config)
    prov["Sources"].insert(0, {"path": os.fspath(bold), "sha256": result.bold_sha256 or sha256_file(bold)})
    sidecar = {
        "RepetitionTime": result.tr,
        "NativeRepetitionTime": result.native_tr,
        "NumberOfVolumes": int(len(result.cleaned)),
        "InputVolumes": int(conf.n_volumes),
        "KeptVolumes": conf.sample_mask.astype(int).tolist(),
        "CensoredVolumes": conf.censored.astype(int).tolist(),
        "NonSteadyStateVolumes": conf.nonsteady.astype(int).tolist(),
        "SampleTimes": np.round(result.times, 6).tolist(),
        "Atlas": atlas,
        "Space": space,
        "ParcelNames": result.names,
        "ConfoundRegressors": conf.columns,
        "QC": qc,
        **prov,
    }
    write_series(out, result.cleaned, result.names, sidecar, sidecar_path=out_json,
                 raw=(out_raw, result.raw) if out_raw else None)


def cli_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="brainfoundry parcellate", description=__doc__.splitlines()[0])
    parser.add_argument("--bold", required=True, help="preprocessed 4D BOLD (.nii or .nii.gz)")
    parser.add_argument("--mask", help="brain mask on the BOLD grid")
    parser.add_argument("--confounds", required=True, help="fMRIPrep desc-confounds_timeseries.tsv")
    parser.add_argument("--confounds-json", help="its JSON sidecar (default: beside the TSV)")
    parser.add_argument("--atlas-dseg", required=True, help="atlas resampled to the BOLD grid (atlas-prepare)")
    parser.add_argument("--atlas-labels", required=True, help="labels TSV from atlas-prepare")
    parser.add_argument("--atlas", required=True, help="atlas name")
    parser.add_argument("--space", required=True)
    parser.add_argument("--tr", type=float, required=True, help="repetition time in seconds")
    parser.add_argument("--denoise", required=True, help="the denoise config section as JSON")
    parser.add_argument("--out", required=True)
    parser.add_argument("--out-json", required=True)
    parser.add_argument("--out-raw", help="uncleaned parcel means of all volumes (parquet, for QC)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    denoise = json.loads(args.denoise)
    result = parcellate_run(args.bold, args.atlas_dseg, args.atlas_labels, confounds_tsv=args.confounds, tr=args.tr,
                            denoise=denoise, mask=args.mask, confounds_json=args.confounds_json)
    inputs = {"bold": args.bold, "mask": args.mask, "confounds": args.confounds, "atlas_dseg": args.atlas_dseg,
              "atlas_labels": args.atlas_labels}
    write_outputs(result, out=args.out, out_json=args.out_json, out_raw=args.out_raw, inputs=inputs,
                  config={"denoise": denoise, "atlas": args.atlas, "space": args.space, "tr": args.tr},
                  atlas=args.atlas, space=args.space)
    log.info("%s: %d x %d parcels kept, %d censored, %d non-steady dropped", args.bold, *result.cleaned.shape,
             len(result.confounds.censored), result.confounds.n_nonsteady_dropped)
    return 0
