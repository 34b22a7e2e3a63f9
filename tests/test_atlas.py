"""Atlas preparation: labels tables, centroids, nearest-neighbour resampling once per grid, download."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import http.server
import ipaddress
import json
import ssl
import threading
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainfoundry.atlas import (
    KNOWN_GRIDS,
    Grid,
    cli_main,
    fetch_atlas,
    grid_for_space,
    parcel_centroids,
    prepare_atlas,
    read_labels_table,
)
from brainfoundry.errors import ConfigError, InputError

SRC_AFFINE = np.array([[-2.0, 0, 0, 20], [0, 2, 0, -24], [0, 0, 2, -16], [0, 0, 0, 1]])  # FSL-like (x flipped)


def small_atlas(path: Path) -> np.ndarray:
    labels = np.zeros((20, 24, 16), np.int16)
    labels[2:10, 2:12, 2:8] = 1
    labels[10:18, 2:12, 2:8] = 2
    labels[2:18, 12:22, 2:14] = 3
    labels[19, 23, 15] = 4  # one corner voxel: lost on a smaller target grid
    nib.save(nib.Nifti1Image(labels, SRC_AFFINE), path)
    return labels


def world_centroid(labels, affine, value):
    ijk = np.argwhere(labels == value).mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


# -- labels tables -----------------------------------------------------------------------------------

def test_read_labels_tsv_with_header(tmp_path):
    path = tmp_path / "labels.tsv"
    path.write_text("index\tname\tx\ty\tz\tnetwork\n0\tBackground\t\t\t\t\n2\tB\t1\t2\t3\tVis\n1\tA\t4\t5\t6\tDefault\n")
    table = read_labels_table(path)
    assert table["index"].tolist() == [1, 2]  # sorted, background row dropped
    assert table["name"].tolist() == ["A", "B"]
    assert table.loc[0, ["x", "y", "z"]].tolist() == [4, 5, 6]
    assert table["network"].tolist() == ["Default", "Vis"]


def test_read_headerless_coordinates_and_order_files(tmp_path):
    coords = tmp_path / "coords.dat"
    coords.write_text("1\t14\t-78\t4\n2\t44\t-64\t4\n")
    table = read_labels_table(coords)
    assert table["name"].tolist() == ["parcel_1", "parcel_2"]
    assert table.loc[1, ["x", "y", "z"]].tolist() == [44, -64, 4]
    order = tmp_path / "order.txt"
    order.write_text("1\t7Networks_LH_Vis_1\t120\t17\t128\t0\n2\t7Networks_RH_Default_3\t1\t2\t3\t0\n")
    table = read_labels_table(order)
    assert table["network"].tolist() == ["Vis", "Default"]
    assert table[["x", "y", "z"]].isna().all().all()


@pytest.mark.parametrize("content, match", [
    ("index\tname\n1\tA\n1\tB\n", "duplicate label values"),
    ("index\tname\n1\tA\n2\tA\n", "duplicate label names"),
    ("name\tx\nA\t1\n", "index"),
    ("1 2\n3\n", "fields"),
])
def test_bad_labels_tables(tmp_path, content, match):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(InputError, match=match):
        read_labels_table(path)


# -- preparing ---------------------------------------------------------------------------------------

def test_resample_once_nearest_with_lost_parcel(tmp_path):
    from nilearn.image import resample_img

    src = tmp_path / "atlas.nii.gz"
    labels = small_atlas(src)
    grid = Grid((18, 22, 14), np.array([[2.0, 0, 0, -16], [0, 2, 0, -22], [0, 0, 2, -14], [0, 0, 0, 1]]))
    out = {k: tmp_path / "out" / f"dseg.{k}" for k in ("nii.gz", "tsv", "json")}
    with pytest.warns(UserWarning, match="lost every voxel"):
        result = prepare_atlas(src, out_labels=out["tsv"], out_json=out["json"], out_dseg=out["nii.gz"], name="Toy",
                               space="Toy_res-2", grid=grid)
    img = nib.load(out["nii.gz"])
    assert img.shape == grid.shape and np.allclose(img.affine, grid.affine)
    reference = resample_img(nib.Nifti1Image(labels, SRC_AFFINE), target_affine=grid.affine, target_shape=grid.shape,
                             interpolation="nearest", force_resample=True, copy_header=True)
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(reference.dataobj))

    table = pd.read_csv(out["tsv"], sep="\t", keep_default_na=False, na_values=["n/a"])
    assert list(table.columns) == ["index", "name", "x", "y", "z", "n_voxels", "network"]
    assert table["name"].tolist() == ["parcel_1", "parcel_2", "parcel_3", "parcel_4"]  # kept although lost
    data = np.asarray(img.dataobj)
    assert table["n_voxels"].tolist() == [int((data == v).sum()) for v in (1, 2, 3, 4)]
    assert table["n_voxels"].iloc[3] == 0
    for row in table.itertuples():  # centroids from the source image, in world mm
        assert np.allclose([row.x, row.y, row.z], world_centroid(labels, SRC_AFFINE, row.index), atol=1e-3)
    sidecar = json.loads(out["json"].read_text())
    assert sidecar["LostParcels"] == [{"index": 4, "name": "parcel_4", "source_voxels": 1}]
    assert sidecar["EmptyParcels"] == ["parcel_4"]
    assert sidecar["SourceSha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert result.lost[0]["index"] == 4 and result.resampled


def test_labels_table_checked_against_image(tmp_path):
    src = tmp_path / "atlas.nii.gz"
    small_atlas(src)
    labels = tmp_path / "labels.tsv"
    labels.write_text("index\tname\n1\tA\n2\tB\n3\tC\n")  # no 4
    with pytest.raises(InputError, match=r"missing from this table: \[4\]"):
        prepare_atlas(src, out_labels=tmp_path / "l.tsv", out_json=tmp_path / "l.json", name="Toy", labels=labels)
    labels.write_text("index\tname\tx\ty\tz\n1\tA\t1\t1\t1\n2\tB\t2\t2\t2\n3\tC\t3\t3\t3\n4\tD\t4\t4\t4\n5\tE\t5\t5\t5\n")
    with pytest.warns(UserWarning, match="no voxels"):
        result = prepare_atlas(src, out_labels=tmp_path / "l.tsv", out_json=tmp_path / "l.json", name="Toy",
                               labels=labels)
    assert result.labels["name"].tolist() == ["A", "B", "C", "D", "E"]
    assert result.labels["x"].tolist() == [1, 2, 3, 4, 5]  # table coordinates win
    assert result.empty == ["E"]
    assert not (tmp_path / "dseg.nii.gz").exists()


def test_no_resample_keeps_own_space(tmp_path):
    src = tmp_path / "atlas.nii.gz"
    labels = small_atlas(src)
    result = prepare_atlas(src, out_labels=tmp_path / "l.tsv", out_json=tmp_path / "l.json", name="Toy")
    assert not result.resampled
    assert result.labels["n_voxels"].tolist() == [int((labels == v).sum()) for v in (1, 2, 3, 4)]
    sidecar = json.loads((tmp_path / "l.json").read_text())
    assert sidecar["Resampled"] is False and sidecar["Grid"]["shape"] == [20, 24, 16]


@pytest.mark.parametrize("data, match", [
    (np.full((4, 4, 4), 1.5, np.float32), "not integers"),
    (np.ones((4, 4, 4, 2), np.int16), "3D"),
    (-np.ones((4, 4, 4), np.int16), "negative"),
])
def test_bad_atlas_images(tmp_path, data, match):
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(InputError, match=match):
        prepare_atlas(path, out_labels=tmp_path / "l.tsv", out_json=tmp_path / "l.json", name="Bad")
    assert not (tmp_path / "l.tsv").exists()


def test_centroids_of_absent_labels_are_nan():
    labels = np.zeros((3, 3, 3), int)
    labels[1, 1, 1] = 5
    coords = parcel_centroids(labels, np.eye(4), [5, 6])
    assert coords[0].tolist() == [1, 1, 1] and np.isnan(coords[1]).all()


def test_grid_for_space(tmp_path):
    grid = grid_for_space("MNI152NLin2009cAsym_res-2")
    assert grid.shape == (97, 115, 97)
    assert np.allclose(grid.affine[:3], [[2, 0, 0, -96], [0, 2, 0, -132], [0, 0, 2, -78]])
    assert grid_for_space("MNI152NLin6Asym_res-2").shape == (91, 109, 91)
    with pytest.raises(ConfigError, match="reference_img"):
        grid_for_space("fsaverage_res-9")
    ref = tmp_path / "ref.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7), np.uint8), SRC_AFFINE), ref)
    grid = grid_for_space("Other_res-3", ref)
    assert grid.shape == (5, 6, 7) and grid.matches((5, 6, 7, 10), SRC_AFFINE)
    assert not grid.matches((5, 6, 7), SRC_AFFINE + np.diag([0, 0, 0.01, 0]))


# -- download ----------------------------------------------------------------------------------------

def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made here (``cryptography``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves ``root``; a path in ``routes`` is answered by that function instead (handler -> None)."""

    root: Path
    routes: dict
    hits: list
    timeout = 20  # a stuck client cannot hold a server thread longer

    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=str(self.root), **kwargs)

    def do_GET(self):
        self.hits.append(self.path)
        route = self.routes.get(self.path)
        return route(self) if route else super().do_GET()

    def log_message(self, *args):
        pass


def _serve(root: Path, cert: tuple[Path, Path] | None, routes: dict, hits: list):
    """A loopback server on a free port (TLS with ``cert``) in a daemon thread; returns (server, base URL)."""
    handler = type("Handler", (_Handler,), {"root": root, "routes": routes, "hits": hits})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*cert)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"{'https' if cert else 'http'}://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def atlas_server(tmp_path, monkeypatch):
    """A loopback HTTPS server (self-signed) serving a directory; yields (base URL, root, CA file, hits)."""
    pytest.importorskip("cryptography")
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)  # loopback, never through a proxy
    root = tmp_path / "www"
    root.mkdir()
    hits: list[str] = []
    cert = _self_signed(tmp_path)
    server, base = _serve(root, cert, {}, hits)
    try:
        yield base, root, cert[0], hits
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def routed_server(tmp_path, monkeypatch):
    """Start loopback servers with special routes: ``start(routes, tls=True) -> base URL``; all are
    shut down after the test. The CA file of the TLS ones is ``start.cafile``."""
    pytest.importorskip("cryptography")
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    cert = _self_signed(tmp_path)
    servers = []

    def start(routes: dict, tls: bool = True) -> str:
        root = tmp_path / f"www{len(servers)}"
        root.mkdir()
        server, base = _serve(root, cert if tls else None, routes, [])
        servers.append(server)
        return base

    start.cafile = cert[0]
    try:
        yield start
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def _stream(sent: list, total: int, length: int | None = None, chunk: int = 1 << 16, pause: float = 0.0):
    """A route that answers ``total`` bytes (Content-Length ``length`` if given) in chunks, counting in
    ``sent`` what the client accepted before it hung up; it stops by itself at ``total``."""
    import time

    def route(handler):
        handler.send_response(200)
        if length is not None:
            handler.send_header("Content-Length", str(length))
        handler.send_header("Connection", "close")
        handler.end_headers()
        block = b"\0" * chunk
        try:
            for _ in range(total // chunk):
                handler.wfile.write(block)
                handler.wfile.flush()
                sent[0] += chunk
                if pause:
                    time.sleep(pause)
        except OSError:  # the client stopped reading: what we wanted to see
            pass
        handler.close_connection = True

    return route


def _redirect(location: str):
    def route(handler):
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return route


def test_fetch_over_https_with_checksum_and_cache(tmp_path, atlas_server):
    base, root, cafile, hits = atlas_server
    small_atlas(root / "toy.nii.gz")
    digest = hashlib.sha256((root / "toy.nii.gz").read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    path = fetch_atlas(f"{base}/toy.nii.gz", digest, cache, cafile=cafile)
    assert path.read_bytes() == (root / "toy.nii.gz").read_bytes()
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary left
    again = fetch_atlas(f"{base}/toy.nii.gz", digest, cache, cafile=cafile)
    assert again == path and len(hits) == 1  # served from the cache


def test_fetch_checksum_mismatch_leaves_nothing(tmp_path, atlas_server):
    base, root, cafile, _ = atlas_server
    small_atlas(root / "toy.nii.gz")
    cache = tmp_path / "cache"
    with pytest.raises(InputError, match="sha256 mismatch") as info:
        fetch_atlas(f"{base}/toy.nii.gz", "0" * 64, cache, cafile=cafile)
    assert info.value.source == f"{base}/toy.nii.gz"
    assert list(cache.iterdir()) == []


def test_fetch_rejects_untrusted_certificate_and_plain_http(tmp_path, atlas_server):
    base, root, _, _ = atlas_server
    small_atlas(root / "toy.nii.gz")
    digest = hashlib.sha256((root / "toy.nii.gz").read_bytes()).hexdigest()
    with pytest.raises(InputError, match="download failed"):  # no CA bundle: self-signed is refused
        fetch_atlas(f"{base}/toy.nii.gz", digest, tmp_path / "cache")
    with pytest.raises(InputError, match="https"):
        fetch_atlas("http://example.org/toy.nii.gz", digest, tmp_path / "cache")
    with pytest.raises(ConfigError, match="sha256"):
        fetch_atlas(f"{base}/toy.nii.gz", "", tmp_path / "cache")


def test_fetch_follows_https_redirects_but_refuses_plain_http(tmp_path, routed_server):
    body = b"atlas bytes"
    digest = hashlib.sha256(body).hexdigest()

    def serve_body(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    plain = routed_server({"/toy.nii.gz": serve_body}, tls=False)
    tls = routed_server({"/toy.nii.gz": serve_body, "/moved.nii.gz": _redirect("/toy.nii.gz"),
                         "/downgrade.nii.gz": _redirect(f"{plain}/toy.nii.gz")})
    cache = tmp_path / "cache"
    path = fetch_atlas(f"{tls}/moved.nii.gz", digest, cache, cafile=routed_server.cafile)
    assert path.read_bytes() == body
    with pytest.raises(InputError, match=rf"redirected to {plain}/toy.nii.gz: only https is followed") as info:
        fetch_atlas(f"{tls}/downgrade.nii.gz", digest, tmp_path / "cache2", cafile=routed_server.cafile)
    assert info.value.source == f"{tls}/downgrade.nii.gz"
    assert not (tmp_path / "cache2").exists() or list((tmp_path / "cache2").iterdir()) == []
    with pytest.raises(InputError, match="must be https"):  # loopback is no exception any more
        fetch_atlas(f"{plain}/toy.nii.gz", digest, tmp_path / "cache3")


@pytest.mark.parametrize("announce", [True, False], ids=["content-length", "no-length"])
def test_fetch_stops_at_max_bytes(tmp_path, routed_server, announce):
    total, cap = 64 << 20, 256 << 10
    sent = [0]
    base = routed_server({"/big.nii.gz": _stream(sent, total, length=total if announce else None)})
    cache = tmp_path / "cache"
    match = "Content-Length is 67108864 bytes, more than atlas.max_bytes" if announce else \
        r"more than atlas.max_bytes \(262144 bytes\); download stopped"
    with pytest.raises(InputError, match=match):
        fetch_atlas(f"{base}/big.nii.gz", "0" * 64, cache, cafile=routed_server.cafile, max_bytes=cap)
    assert list(cache.iterdir()) == []
    # The client hung up at the cap: the server got rid of no more than the cap plus socket buffers.
    import time

    time.sleep(0.5)
    assert sent[0] < 16 << 20, sent[0]


def test_fetch_has_an_overall_timeout(tmp_path, routed_server):
    import time

    sent = [0]
    drip = _stream(sent, 200, length=200, chunk=1, pause=0.1)  # 200 bytes over 20 s, each read quick
    base = routed_server({"/slow.nii.gz": drip})
    started = time.monotonic()
    with pytest.raises(InputError, match=r"download took longer than 1 s; stopped"):
        fetch_atlas(f"{base}/slow.nii.gz", "0" * 64, tmp_path / "cache", cafile=routed_server.cafile,
                    timeout=1.0, read_timeout=10.0)
    assert time.monotonic() - started < 4
    assert 0 < sent[0] < 60


def _connect_proxy(tunnels: list):
    """A one-thread HTTP CONNECT proxy on loopback (what ``https_proxy`` names on a cluster); records
    the tunnels it opened. Returns (listening socket, port); closing the socket stops it."""
    import select
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(20)

    def serve():
        with contextlib.suppress(OSError):
            client, _ = listener.accept()
            with client:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += client.recv(4096)
                target = request.split()[1].decode()
                tunnels.append(target)
                host, port = target.rsplit(":", 1)
                with socket.create_connection((host, int(port)), timeout=20) as upstream:
                    client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    for _ in range(10_000):  # bounded relay
                        ready, _, _ = select.select([client, upstream], [], [], 20)
                        if not ready:
                            break
                        data = ready[0].recv(65536)
                        if not data:
                            break
                        (upstream if ready[0] is client else client).sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return listener, listener.getsockname()[1]


def test_fetch_goes_through_https_proxy(tmp_path, atlas_server, monkeypatch):
    base, root, cafile, hits = atlas_server
    small_atlas(root / "toy.nii.gz")
    digest = hashlib.sha256((root / "toy.nii.gz").read_bytes()).hexdigest()
    tunnels: list[str] = []
    listener, port = _connect_proxy(tunnels)
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    try:
        path = fetch_atlas(f"{base}/toy.nii.gz", digest, tmp_path / "cache", cafile=cafile)
    finally:
        listener.close()
    assert path.read_bytes() == (root / "toy.nii.gz").read_bytes()
    assert tunnels == [base.removeprefix("https://")] and hits == ["/toy.nii.gz"]


def test_max_bytes_default_is_the_schemas():
    import yaml

    from brainfoundry.atlas import DEFAULT_MAX_BYTES
    from brainfoundry.workflow.atlas import rule_source_args

    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "config.schema.yaml").read_text())
    assert schema["properties"]["atlas"]["properties"]["max_bytes"]["default"] == DEFAULT_MAX_BYTES
    args = rule_source_args({"url": "https://example.org/a.nii.gz", "sha256": "0" * 64, "max_bytes": 1000})
    assert args.endswith("--max-bytes 1000")


def test_cli_downloads_and_prepares(tmp_path, atlas_server):
    base, root, cafile, _ = atlas_server
    small_atlas(root / "toy.nii.gz")
    digest = hashlib.sha256((root / "toy.nii.gz").read_bytes()).hexdigest()
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli_main(["--url", f"{base}/toy.nii.gz", "--sha256", digest, "--cache-dir", str(tmp_path / "cache"),
                         "--ca-bundle", str(cafile), "--name", "Toy", "--space", "MNI152NLin6Asym_res-2",
                         "--out-dseg", str(out / "d.nii.gz"), "--out-labels", str(out / "d.tsv"),
                         "--out-json", str(out / "d.json")])
    assert code == 0
    assert nib.load(out / "d.nii.gz").shape == (91, 109, 91)
    assert json.loads((out / "d.json").read_text())["Source"] == f"{base}/toy.nii.gz"


# -- real atlases ------------------------------------------------------------------------------------

@pytest.mark.shared_data
def test_a424_to_fmriprep_grid(tmp_path, a424):
    from nilearn.image import resample_to_img

    coords = a424.parent / "A424_Coordinates.dat"
    out = {k: tmp_path / f"a424.{k}" for k in ("nii.gz", "tsv", "json")}
    result = prepare_atlas(a424, out_labels=out["tsv"], out_json=out["json"], out_dseg=out["nii.gz"], name="A424",
                           space="MNI152NLin2009cAsym_res-2", labels=coords,
                           grid=KNOWN_GRIDS["MNI152NLin2009cAsym_res-2"])
    table = result.labels
    assert len(table) == 424 and table["index"].tolist() == list(range(1, 425))
    assert result.lost == [] and result.empty == []
    source = np.asarray(nib.load(a424).dataobj)
    # FSL's 2 mm grid and fMRIPrep's share voxel centres: nearest neighbour keeps every voxel.
    assert table["n_voxels"].tolist() == [int((source == v).sum()) for v in range(1, 425)]
    first = np.loadtxt(coords)[0]
    assert table.loc[0, ["x", "y", "z"]].tolist() == first[1:].tolist()
    img = nib.load(out["nii.gz"])
    ref_grid = nib.Nifti1Image(np.zeros((97, 115, 97), np.uint8), KNOWN_GRIDS["MNI152NLin2009cAsym_res-2"].affine)
    reference = resample_to_img(nib.load(a424), ref_grid, interpolation="nearest", force_resample=True,
                                copy_header=True)
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.rint(np.asarray(reference.dataobj)))


@pytest.mark.shared_data
def test_cc200_labels_without_resampling(tmp_path, shared_data):
    cc200 = shared_data / "atlases" / "cc200" / "CC200.nii.gz"
    if not cc200.exists():
        pytest.skip(f"{cc200} not found")
    out = tmp_path / "cc200"
    assert cli_main(["--atlas", str(cc200), "--name", "CC200", "--space", "MNI152NLin6Asym_res-3", "--no-resample",
                     "--out-labels", str(out / "l.tsv"), "--out-json", str(out / "l.json")]) == 0
    table = pd.read_csv(out / "l.tsv", sep="\t")
    assert len(table) == 200 and table["name"].iloc[0] == "parcel_1"
    assert table[["x", "y", "z"]].notna().all().all()
    assert table["x"].between(-90, 90).all() and table["z"].between(-72, 110).all()
    assert sorted(p.name for p in out.iterdir()) == ["l.json", "l.tsv"]


# -- labels only (timeseries entry point, issue 14) ----------------------------------------------------------
@pytest.mark.parametrize("coords", [True, False])
def test_labels_table_alone_prepares_the_atlas(tmp_path, coords):
    from brainfoundry.runfiles import read_labels

    table = pd.DataFrame({"index": [3, 1, 2], "name": ["c", "a", "b"]})
    if coords:
        table["x"], table["y"], table["z"] = [30.0, 10.0, 20.0], [1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]
    src = tmp_path / "labels_in.tsv"
    table.to_csv(src, sep="\t", index=False)
    out = tmp_path / "out"
    assert cli_main(["--labels", str(src), "--no-resample", "--name", "Mine", "--space", "MNI152NLin6Asym_res-2",
                     "--out-labels", str(out / "l.tsv"), "--out-json", str(out / "l.json")]) == 0
    labels = read_labels(out / "l.tsv")
    assert list(labels["name"]) == ["a", "b", "c"]  # label order
    if coords:
        assert list(labels["x"]) == [10.0, 20.0, 30.0]
    else:
        assert labels[["x", "y", "z"]].isna().all().all()
    info = json.loads((out / "l.json").read_text())
    assert info["NParcels"] == 3 and info["Source"] is None and info["Centroids"] == ("labels table" if coords else None)
    assert sorted(p.name for p in out.iterdir()) == ["l.json", "l.tsv"]


def test_no_image_without_labels_or_for_resampling_names_atlas_path(tmp_path):
    with pytest.raises(ConfigError, match="atlas.path"):
        cli_main(["--no-resample", "--name", "M", "--space", "S", "--out-labels", str(tmp_path / "l.tsv"),
                  "--out-json", str(tmp_path / "l.json")])
    from brainfoundry.workflow.atlas import rule_source_args

    assert rule_source_args({"path": None, "url": None, "labels": "x.tsv"}) == ""
