"""Atlas preparation: fetch (path, or bounded https + sha256), labels + centroids, resample once per grid.

An atlas is a 3D NIfTI label image (0 = background) plus a labels table. The labels table can be

- a TSV with a header naming at least ``index`` and ``name`` (optional ``x``, ``y``, ``z`` in MNI mm,
  ``network``), like a nilearn/BIDS look-up table;
- a header-less whitespace table whose first column is the label value: ``index x y z`` (A424's
  ``A424_Coordinates.dat``) or ``index name ...`` (Schaefer's ``*_order.txt``, colours ignored);
- absent: names are ``parcel_<index>`` for every non-zero value of the image.

Centroids come from the table when it has coordinates, else they are the centre of mass of each
parcel's voxels in world (MNI mm) coordinates of the source image.

The resampled label image is written once per (atlas, BOLD grid) as a workflow output and every run
of that grid reuses it. The grid is the configured space's (``KNOWN_GRIDS``) or a reference image's,
never a particular run's, so adding a subject does not change the atlas job. Resampling is nearest
neighbour (nilearn ``resample_img``); parcels that lose every voxel are warned about and listed in the
JSON sidecar but stay in the labels table, so every run of an atlas has the same columns.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import re
import socket
import ssl
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from brainfoundry.errors import ConfigError, InputError
from brainfoundry.io import atomic_path, provenance, sha256_file, write_json_atomic
from brainfoundry.runfiles import LABEL_COLUMNS, write_labels

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Grid:
    """A voxel grid: 3D shape and 4x4 voxel-to-world affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def matches(self, shape: Sequence[int], affine: np.ndarray, atol: float = 1e-3) -> bool:
        """True when ``shape`` (first three axes) and ``affine`` are this grid (``atol`` in mm)."""
        return tuple(int(s) for s in shape[:3]) == self.shape and bool(
            np.allclose(np.asarray(affine, dtype=float), self.affine, atol=atol)
        )

    def describe(self) -> str:
        rows = np.array2string(self.affine[:3], precision=3, suppress_small=True, separator=",").replace("\n", "")
        return f"shape {self.shape}, affine {rows}"

    @classmethod
    def of(cls, img: nib.spatialimages.SpatialImage) -> Grid:
        return cls(tuple(int(s) for s in img.shape[:3]), np.asarray(img.affine, dtype=float))


def _affine(zooms: float, origin: Sequence[float], flip_x: bool = False) -> np.ndarray:
    aff = np.diag([zooms, zooms, zooms, 1.0])
    if flip_x:
        aff[0, 0] = -zooms
    aff[:3, 3] = origin
    return aff


# Output grids of fMRIPrep spaces (TemplateFlow resolutions) and the FSL MNI152 grids. Other spaces
# need ``atlas.reference_img``. MNI152NLin6Asym follows FSL's MNI152 grid (x flipped, origin 90 mm).
KNOWN_GRIDS: dict[str, Grid] = {
    "MNI152NLin2009cAsym_res-1": Grid((193, 229, 193), _affine(1.0, (-96.0, -132.0, -78.0))),
    "MNI152NLin2009cAsym_res-2": Grid((97, 115, 97), _affine(2.0, (-96.0, -132.0, -78.0))),
    "MNI152NLin6Asym_res-1": Grid((182, 218, 182), _affine(1.0, (90.0, -126.0, -72.0), flip_x=True)),
    "MNI152NLin6Asym_res-2": Grid((91, 109, 91), _affine(2.0, (90.0, -126.0, -72.0), flip_x=True)),
}


def grid_for_space(space: str, reference_img: str | os.PathLike | None = None) -> Grid:
    """The BOLD grid of a configured space: a reference image's grid if given, else ``KNOWN_GRIDS``.

    Raises
    ------
    ConfigError
        When the space is unknown and no reference image is configured.
    """
    if reference_img:
        try:
            img = nib.load(os.fspath(reference_img))
        except Exception as err:  # nibabel raises several types for unreadable files
            raise InputError(reference_img, f"cannot read reference image: {err}") from err
        return Grid.of(img)
    if space in KNOWN_GRIDS:
        return KNOWN_GRIDS[space]
    raise ConfigError(
        "atlas.reference_img",
        f"space {space!r} has no known grid (known: {sorted(KNOWN_GRIDS)}); set atlas.reference_img "
        "to an image on the BOLD grid of that space",
    )


# -- fetching ---------------------------------------------------------------------------------------

# Schema default of atlas.max_bytes (config/config.schema.yaml; tests check they agree): atlases are a
# few MB, the largest 1 mm label images some tens of MB.
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_TIMEOUT_S = 300.0  # the whole download, redirects included
READ_TIMEOUT_S = 30.0  # one connect or read
MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)


def fetch_atlas(url: str, sha256: str, cache_dir: str | os.PathLike, *, cafile: str | os.PathLike | None = None,
                max_bytes: int = DEFAULT_MAX_BYTES, timeout: float = DEFAULT_TIMEOUT_S,
                read_timeout: float = READ_TIMEOUT_S) -> Path:
    """Download ``url`` into ``cache_dir`` (once), verify its sha256 and return the cached path.

    The download goes to a temporary name in the cache and is renamed only after the checksum
    matched, so a failed or tampered download never appears under the cache name. Bounds:

    - https only, through every redirect (at most ``MAX_REDIRECTS``); ``cafile`` is a PEM CA bundle
      trusted in addition to the system's (a private mirror, or the tests' self-signed server);
    - at most ``max_bytes`` (``atlas.max_bytes``): a larger Content-Length is refused before the body,
      and the stream is stopped as soon as it passes the cap (servers that send no length, or lie);
    - ``timeout`` seconds for the whole download (a server that drips bytes cannot hold the job),
      ``read_timeout`` for each connect or read.

    ``https_proxy``/``no_proxy`` are honoured as urllib does (a CONNECT tunnel).

    Raises
    ------
    InputError
        Naming the URL: not https (or redirected to something else), too large, too slow, HTTP or
        network failure, or a checksum mismatch.
    """
    if not sha256 or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ConfigError("atlas.sha256", "an atlas url needs its sha256 (64 lowercase hex digits)")
    if urllib.parse.urlsplit(url).scheme != "https":
        raise InputError(url, "atlas URLs must be https")
    if max_bytes < 1:
        raise ConfigError("atlas.max_bytes", f"must be a positive number of bytes, got {max_bytes}")
    name = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name or "atlas.nii.gz"
    cache = Path(cache_dir)
    target = cache / f"{sha256[:16]}_{name}"
    if target.exists():
        found = sha256_file(target)
        if found == sha256:
            return target
        log.warning("cached atlas %s has sha256 %s, expected %s; downloading again", target, found, sha256)
    context = ssl.create_default_context()
    if cafile:
        try:
            context.load_verify_locations(cafile=os.fspath(cafile))
        except (OSError, ssl.SSLError) as err:
            raise InputError(cafile, f"cannot load CA bundle: {err}") from err
    digest = hashlib.sha256()
    with atomic_path(target) as tmp:  # removed unless the block finishes: no half or bad file in the cache
        with open(tmp, "wb") as out:
            _download(url, out, digest, context, max_bytes=max_bytes, timeout=timeout, read_timeout=read_timeout)
        if digest.hexdigest() != sha256:
            raise InputError(url, f"sha256 mismatch: expected {sha256}, downloaded file has {digest.hexdigest()}")
    return target


def _download(url: str, out, digest, context: ssl.SSLContext, *, max_bytes: int, timeout: float,
              read_timeout: float) -> None:
    """Stream ``url`` into ``out`` within the bounds of :func:`fetch_atlas` (redirects followed here,
    so that each hop is checked)."""
    import http.client
    import threading
    import time

    deadline = time.monotonic() + timeout
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(current)
        if parts.scheme != "https":
            raise InputError(url, f"redirected to {current}: only https is followed")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise InputError(url, f"download took longer than {timeout:g} s; stopped")
        conn = _connection(parts, context, min(read_timeout, remaining))
        expired = threading.Event()

        def abort(conn=conn, expired=expired):
            # The overall bound: a blocked connect/read wakes up when its socket is shut down.
            expired.set()
            if conn.sock is not None:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)

        watchdog = threading.Timer(remaining, abort)
        watchdog.daemon = True
        watchdog.start()
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", target, headers={"Accept-Encoding": "identity", "User-Agent": "brainfoundry"})
            response = conn.getresponse()
            if response.status in _REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise InputError(url, f"HTTP {response.status} redirect without a Location header")
                current = urllib.parse.urljoin(current, location)
                continue
            if response.status != 200:
                raise InputError(url, f"download failed: HTTP {response.status} {response.reason}")
            length = response.getheader("Content-Length")
            if length and length.strip().isdigit() and int(length) > max_bytes:
                raise InputError(url, f"Content-Length is {int(length)} bytes, more than atlas.max_bytes "
                                      f"({max_bytes}); not downloaded")
            received = 0
            while block := response.read1(1 << 16):  # what has arrived, so a drip is checked often
                received += len(block)
                if received > max_bytes:
                    raise InputError(url, f"more than atlas.max_bytes ({max_bytes} bytes); download stopped")
                if time.monotonic() > deadline:
                    raise InputError(url, f"download took longer than {timeout:g} s; stopped")
                digest.update(block)
                out.write(block)
            if expired.is_set():  # the socket was shut down under a read: an end of data that is not one
                raise InputError(url, f"download took longer than {timeout:g} s; stopped")
            return
        except (OSError, http.client.HTTPException, ValueError) as err:  # ssl/socket errors are OSErrors
            if expired.is_set():
                raise InputError(url, f"download took longer than {timeout:g} s; stopped") from err
            raise InputError(url, f"download failed: {err}") from err
        finally:
            watchdog.cancel()
            conn.close()
    raise InputError(url, f"more than {MAX_REDIRECTS} redirects")


def _connection(parts: urllib.parse.SplitResult, context: ssl.SSLContext, timeout: float):
    """An HTTPS connection to the URL's host, through ``https_proxy`` (CONNECT) unless ``no_proxy`` says not."""
    import http.client

    host, port = parts.hostname or "", parts.port or 443
    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(host):
        proxied = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        headers = {}
        if proxied.username:
            import base64

            token = f"{urllib.parse.unquote(proxied.username)}:{urllib.parse.unquote(proxied.password or '')}"
            headers["Proxy-Authorization"] = "Basic " + base64.b64encode(token.encode()).decode()
        conn = http.client.HTTPSConnection(proxied.hostname, proxied.port or 8080, timeout=timeout, context=context)
        conn.set_tunnel(host, port, headers=headers)
        return conn
    return http.client.HTTPSConnection(host, port, timeout=timeout, context=context)


def resolve_atlas_source(atlas_cfg: dict, *, cafile: str | None = None) -> Path:
    """The local atlas image of an ``atlas`` config section (``path``, or ``url`` + ``sha256``)."""
    path, url = atlas_cfg.get("path"), atlas_cfg.get("url")
    if path and url:
        raise ConfigError("atlas", "set either atlas.path or atlas.url, not both")
    if path:
        if not Path(path).exists():
            raise InputError(path, "atlas image not found")
        return Path(path)
    if url:
        return fetch_atlas(url, atlas_cfg.get("sha256") or "", atlas_cfg.get("cache_dir", ".cache/brainfoundry/atlases"),
                           cafile=cafile, max_bytes=int(atlas_cfg.get("max_bytes", DEFAULT_MAX_BYTES)))
    raise ConfigError("atlas", "set atlas.path or atlas.url")


# -- reading ----------------------------------------------------------------------------------------

def read_volume(path: str | os.PathLike, what: str, not_3d: str) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Read a 3D image (a trailing 4th axis of length 1 is dropped); errors name the file and ``what``."""
    try:
        img = nib.load(os.fspath(path))
        data = np.asanyarray(img.dataobj)
    except Exception as err:
        raise InputError(path, f"cannot read {what}: {err}") from err
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"{not_3d}, got shape {data.shape}")
    return img, data


def load_label_image(path: str | os.PathLike) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Read a 3D label image; return the image and its labels as an int32 array.

    Raises
    ------
    InputError
        Unreadable file, not 3D, or values that are not non-negative integers.
    """
    img, data = read_volume(path, "atlas image", "an atlas must be a 3D label image")
    if not np.all(np.isfinite(data)):
        raise InputError(path, "atlas image has NaN/inf values")
    rounded = np.rint(data)
    if not np.array_equal(rounded, data):
        raise InputError(path, "atlas values are not integers; expected a label (dseg) image, not a probability map")
    if rounded.min() < 0:
        raise InputError(path, "atlas has negative label values")
    return img, rounded.astype(np.int32)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_labels_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read an atlas labels table into columns ``index``, ``name``, ``x``, ``y``, ``z``, ``network``.

    Coordinates are NaN and networks empty where the table does not give them.
    """
    path = Path(path)
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError as err:
        raise InputError(path, f"cannot read labels table: {err}") from err
    if not lines:
        raise InputError(path, "labels table is empty")
    first = lines[0].split("\t") if "\t" in lines[0] else lines[0].split()
    if _is_number(first[0]):
        table = _read_headerless(path, lines)
    else:
        table = pd.read_csv(path, sep="\t", comment=None)
        table.columns = [str(c).strip().lower() for c in table.columns]
        if "index" not in table.columns and "label" in table.columns:
            table = table.rename(columns={"label": "index"})
        if "index" not in table.columns:
            raise InputError(path, f"labels TSV needs an 'index' column (has {list(table.columns)})")
    for col in ("x", "y", "z"):
        if col not in table.columns:
            table[col] = np.nan
    if "name" not in table.columns:
        table["name"] = [f"parcel_{int(i)}" for i in table["index"]]
    if "network" not in table.columns:
        table["network"] = [_network_from_name(str(n)) for n in table["name"]]
    try:
        table["index"] = pd.to_numeric(table["index"], downcast=None).astype(np.int64)
    except (ValueError, TypeError) as err:
        raise InputError(path, f"label index values are not integers: {err}") from err
    table["name"] = table["name"].astype(str).str.strip()
    table["network"] = table["network"].fillna("").astype(str)
    for col in ("x", "y", "z"):
        table[col] = pd.to_numeric(table[col], errors="coerce").astype(float)
    table = table[table["index"] != 0]  # background rows of look-up tables
    if table["index"].duplicated().any():
        raise InputError(path, f"duplicate label values {table['index'][table['index'].duplicated()].tolist()[:5]}")
    if table["name"].duplicated().any():
        raise InputError(path, f"duplicate label names {table['name'][table['name'].duplicated()].tolist()[:5]}")
    return table[["index", "name", "x", "y", "z", "network"]].sort_values("index").reset_index(drop=True)


def _read_headerless(path: Path, lines: list[str]) -> pd.DataFrame:
    rows = [ln.split("\t") if "\t" in ln else ln.split() for ln in lines]
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise InputError(path, f"rows have different numbers of fields {sorted(widths)}")
    width = widths.pop()
    if width == 4 and all(_is_number(v) for r in rows for v in r):  # index x y z (A424_Coordinates.dat)
        return pd.DataFrame({"index": [int(float(r[0])) for r in rows],
                             "x": [float(r[1]) for r in rows], "y": [float(r[2]) for r in rows],
                             "z": [float(r[3]) for r in rows]})
    if width >= 2 and not _is_number(rows[0][1]):  # index name [colours...] (Schaefer order file)
        return pd.DataFrame({"index": [int(float(r[0])) for r in rows], "name": [r[1] for r in rows]})
    raise InputError(path, "header-less labels table must be 'index x y z' or 'index name ...' per row")


_YEO_RE = re.compile(r"^\d+Networks_[LR]H_([A-Za-z]+)_")


def _network_from_name(name: str) -> str:
    """Yeo network from Schaefer-style names (``7Networks_LH_Vis_1`` -> ``Vis``), else empty."""
    match = _YEO_RE.match(name)
    return match.group(1) if match else ""


def parcel_centroids(labels: np.ndarray, affine: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    """Centre of mass (world mm) of each label in ``indices``; NaN rows for labels without voxels."""
    flat = labels.ravel()
    order = np.argsort(flat, kind="stable")
    sorted_labels = flat[order]
    coords = np.empty((len(indices), 3))
    for row, value in enumerate(indices):
        lo, hi = np.searchsorted(sorted_labels, [value, value + 1])
        if hi == lo:
            coords[row] = np.nan
            continue
        ijk = np.column_stack(np.unravel_index(order[lo:hi], labels.shape)).mean(axis=0)
        coords[row] = affine[:3, :3] @ ijk + affine[:3, 3]
    return coords


def voxel_counts(labels: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    counts = np.bincount(labels.ravel(), minlength=int(max(indices, default=0)) + 1)
    return np.array([counts[i] if i < len(counts) else 0 for i in indices], dtype=np.int64)


def build_labels(labels: np.ndarray, affine: np.ndarray, labels_path: str | os.PathLike | None,
                 source: str | os.PathLike) -> pd.DataFrame:
    """The labels table of an atlas (index, name, x, y, z, network) checked against its image."""
    present = np.unique(labels)
    present = present[present != 0]
    if labels_path:
        table = read_labels_table(labels_path)
        unknown = sorted(set(present.tolist()) - set(table["index"].tolist()))
        if unknown:
            raise InputError(labels_path, f"atlas {source} has label values missing from this table: "
                                          f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
        absent = sorted(set(table["index"].tolist()) - set(present.tolist()))
        if absent:
            warnings.warn(f"{labels_path}: labels {absent[:10]} have no voxels in {source}; kept as empty parcels",
                          stacklevel=2)
    else:
        table = pd.DataFrame({"index": present.astype(np.int64), "name": [f"parcel_{int(i)}" for i in present],
                              "x": np.nan, "y": np.nan, "z": np.nan, "network": ""})
    missing_xyz = table[["x", "y", "z"]].isna().any(axis=1).to_numpy()
    if missing_xyz.any():
        computed = parcel_centroids(labels, affine, table.loc[missing_xyz, "index"].tolist())
        table.loc[missing_xyz, ["x", "y", "z"]] = computed
    return table.reset_index(drop=True)


# -- preparing --------------------------------------------------------------------------------------

@dataclass
class PreparedAtlas:
    labels: pd.DataFrame  # index, name, x, y, z, n_voxels, network
    lost: list[dict]  # parcels with voxels in the source but none in the grid
    empty: list[str]  # names of parcels without voxels in the output grid
    resampled: bool


def resample_labels(img: nib.Nifti1Image, labels: np.ndarray, grid: Grid) -> np.ndarray:
    """Labels on ``grid`` by nearest neighbour (a copy when the grids already agree)."""
    if grid.matches(labels.shape, img.affine):
        return labels.copy()
    from nilearn.image import resample_img

    src = nib.Nifti1Image(labels, img.affine)
    out = resample_img(src, target_affine=grid.affine, target_shape=grid.shape, interpolation="nearest",
                       force_resample=True, copy_header=True)
    return np.rint(np.asarray(out.dataobj)).astype(np.int32)


def prepare_atlas(atlas_img: str | os.PathLike, *, out_labels: str | os.PathLike, out_json: str | os.PathLike,
                  name: str, space: str | None = None, labels: str | os.PathLike | None = None,
                  grid: Grid | None = None, out_dseg: str | os.PathLike | None = None,
                  source: str | None = None, config: dict | None = None) -> PreparedAtlas:
    """Write an atlas's labels TSV (+ JSON) and, with ``grid``, its label image resampled to that grid.

    Parameters
    ----------
    atlas_img : path
        The local label image (after :func:`fetch_atlas` for URLs).
    out_labels, out_json : path
        Labels TSV (index, name, x, y, z, n_voxels, network) and sidecar (lost parcels, checksum).
    name, space : str
        Atlas name (``seg-<name>``) and the space label written to the sidecar.
    labels : path, optional
        Labels table; names default to ``parcel_<index>`` and centroids are computed when absent.
    grid : Grid, optional
        Target BOLD grid. ``None`` keeps the atlas in its own space and writes no image (the
        ``timeseries`` entry point, e.g. CC200 at 3 mm): ``n_voxels`` then counts source voxels.
    out_dseg : path, optional
        Where the resampled label image goes; required with ``grid``.
    source : str, optional
        Where the atlas came from (URL) for the sidecar; defaults to the image path.
    """
    if grid is not None and out_dseg is None:
        raise ValueError("out_dseg is required when resampling to a grid")
    img, data = load_label_image(atlas_img)
    table = build_labels(data, img.affine, labels, atlas_img)
    indices = table["index"].tolist()
    source_counts = voxel_counts(data, indices)
    if grid is not None:
        target = resample_labels(img, data, grid)
        counts = voxel_counts(target, indices)
    else:
        target, counts = None, source_counts
    table["n_voxels"] = counts
    table = table[LABEL_COLUMNS]
    lost = [{"index": int(i), "name": n, "source_voxels": int(s)}
            for i, n, s, c in zip(indices, table["name"], source_counts, counts) if s > 0 and c == 0]
    empty = [n for n, c in zip(table["name"], counts) if c == 0]
    if lost:
        warnings.warn(f"atlas {name}: {len(lost)} parcel(s) lost every voxel when resampled to "
                      f"{grid.describe() if grid else 'its grid'}: {[p['name'] for p in lost][:10]}; "
                      "they stay as all-zero columns", stacklevel=2)

    if target is not None:
        dtype = np.int16 if target.max(initial=0) < np.iinfo(np.int16).max else np.int32
        out_img = nib.Nifti1Image(target.astype(dtype), grid.affine)
        out_img.header.set_xyzt_units("mm")
        out_img.header.set_intent("label")
        with atomic_path(out_dseg) as tmp:
            nib.save(out_img, tmp)
    write_labels(out_labels, table)
    sidecar = {
        "Atlas": name,
        "Space": space,
        "Source": source or os.fspath(atlas_img),
        "SourceSha256": sha256_file(atlas_img),
        "LabelsSource": os.fspath(labels) if labels else None,
        "NParcels": len(table),
        "Resampled": target is not None,
        "Interpolation": "nearest" if target is not None else None,
        "Grid": ({"shape": list(grid.shape), "affine": grid.affine.tolist()} if grid is not None
                 else {"shape": list(data.shape), "affine": np.asarray(img.affine).tolist()}),
        "LostParcels": lost,
        "EmptyParcels": empty,
        **provenance([p for p in (atlas_img, labels) if p], config or {"atlas": name, "space": space}),
    }
    write_json_atomic(out_json, sidecar)
    return PreparedAtlas(labels=table, lost=lost, empty=empty, resampled=target is not None)


def prepare_labels_only(labels: str | os.PathLike, *, out_labels: str | os.PathLike, out_json: str | os.PathLike,
                        name: str, space: str | None = None) -> pd.DataFrame:
    """The labels TSV (+ JSON) of an atlas known only by its labels table (``timeseries`` entry point).

    Centroids are the table's ``x, y, z`` where given, else unknown (NaN: only families with
    ``spatial_embedding: learned`` can use such an atlas; brainfoundry.checks says so at start-up).
    ``n_voxels`` is unknown without an image.
    """
    table = read_labels_table(labels)
    table["n_voxels"] = np.nan
    table = table[LABEL_COLUMNS]
    write_labels(out_labels, table)
    has_xyz = not table[["x", "y", "z"]].isna().any(axis=None)
    write_json_atomic(out_json, {
        "Atlas": name, "Space": space, "Source": None, "SourceSha256": None, "LabelsSource": os.fspath(labels),
        "NParcels": len(table), "Resampled": False, "Interpolation": None, "Grid": None,
        "Centroids": "labels table" if has_xyz else None, "LostParcels": [], "EmptyParcels": [],
        **provenance([labels], {"atlas": name, "space": space, "labels_only": True}),
    })
    return table


# -- command line -----------------------------------------------------------------------------------

def cli_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="brainfoundry atlas-prepare", description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--atlas", help="local NIfTI label image (optional with --no-resample and --labels)")
    src.add_argument("--url", help="https URL of the label image (needs --sha256)")
    parser.add_argument("--sha256", help="expected sha256 of the downloaded image")
    parser.add_argument("--cache-dir", default=".cache/brainfoundry/atlases", help="download cache")
    parser.add_argument("--ca-bundle", help="extra CA certificates (PEM) for the https download")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                        help=f"refuse a download larger than this (atlas.max_bytes; default {DEFAULT_MAX_BYTES})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds for the whole download (default {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--labels", help="labels table (TSV index,name[,x,y,z,network] or 'index x y z')")
    parser.add_argument("--name", required=True, help="atlas name (seg-<name>)")
    parser.add_argument("--space", required=True, help="BOLD space, e.g. MNI152NLin2009cAsym_res-2")
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--reference-img", help="image on the target BOLD grid (for spaces without a known grid)")
    grid.add_argument("--no-resample", action="store_true", help="keep the atlas in its own space; write no image")
    parser.add_argument("--out-dseg", help="resampled label image (.nii.gz)")
    parser.add_argument("--out-labels", required=True)
    parser.add_argument("--out-json", required=True)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.atlas and not args.url:
        if not (args.labels and args.no_resample):
            raise ConfigError("atlas.path", "no atlas image (atlas.path / atlas.url); a labels table alone "
                                            "(atlas.labels) is enough only for already parcellated series")
        table = prepare_labels_only(args.labels, out_labels=args.out_labels, out_json=args.out_json,
                                    name=args.name, space=args.space)
        log.info("atlas %s: %d parcels from %s (no image)", args.name, len(table), args.labels)
        return 0
    if args.url:
        path = fetch_atlas(args.url, args.sha256 or "", args.cache_dir, cafile=args.ca_bundle,
                           max_bytes=args.max_bytes, timeout=args.timeout)
    else:
        path = Path(args.atlas)
        if not path.exists():
            raise InputError(path, "atlas image not found")
    target = None if args.no_resample else grid_for_space(args.space, args.reference_img)
    if target is not None and not args.out_dseg:
        parser.error("--out-dseg is required unless --no-resample")
    config = {"atlas": args.name, "space": args.space, "url": args.url, "sha256": args.sha256,
              "reference_img": args.reference_img, "resample": target is not None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = prepare_atlas(path, out_labels=args.out_labels, out_json=args.out_json, name=args.name,
                               space=args.space, labels=args.labels, grid=target,
                               out_dseg=args.out_dseg if target is not None else None,
                               source=args.url or None, config=config)
    for warning in caught:
        log.warning("%s", warning.message)
    log.info("atlas %s: %d parcels, %d empty in the grid (%d lost by resampling)", args.name,
             len(result.labels), len(result.empty), len(result.lost))
    return 0
