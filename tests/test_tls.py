"""TLS with HTTP/2 and HTTP/1.1 on one port (embedded granian), checked with real clients: curl,
h2load and skopeo against a real `edgecache serve` with certificates from a throwaway CA.
(dockerd with an https mirror is in test_clients.py, beside the other dockerd tests.)"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import EdgeProcess, Seeded, spawn_edge
from tests.support.certs import Issued, TestCA, served_serial, wait_for_serial
from tests.support.clients import skopeo_copy_all
from tests.support.curl import curl
from tests.support.faults import FaultProxy
from tests.support.images import Image, Pusher, build_image
from tests.support.logs import access_records
from tests.support.registry import Registry, free_port
from tests.support.waiting import wait_until_sync

MANIFEST_ACCEPT = "Accept: application/vnd.docker.distribution.manifest.v2+json"


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "pki")


@pytest.fixture
def server_cert(ca: TestCA) -> Issued:
    return ca.issue("edge")


@pytest.fixture
def tls_edge(tmp_path: Path, origin: Registry, seeded: Seeded, server_cert: Issued) -> Iterator[EdgeProcess]:
    args = ("--tls-cert", str(server_cert.cert), "--tls-key", str(server_cert.key))
    # Prefetch off: the first blob GET must be the client's own miss, streamed while it fills.
    config = "[prefetch]\nenabled = false\n"
    with spawn_edge(tmp_path, origin.url, config=config, args=args, tls=True) as running:
        yield running


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("http2", [True, False], ids=["http2", "http1.1"])
def test_tls_serves_verified_manifests_blobs_and_ranges(
    tls_edge: EdgeProcess, ca: TestCA, seeded: Seeded, http2: bool
) -> None:
    version = "2" if http2 else "1.1"
    manifest = curl(
        f"{tls_edge.url}/v2/library/big/manifests/latest",
        http2=http2,
        cacert=ca.cert_path,
        headers=(MANIFEST_ACCEPT,),
    )
    assert (manifest.returncode, manifest.status, manifest.http_version) == (0, 200, version)
    assert manifest.body == seeded.big.manifest.data  # the certificate verified against our CA too
    layer = seeded.big.layers[-1]  # ~24 MiB: the miss streams the fill, the hit is sent from disk
    for expected_cache in ("MISS", "HIT"):
        got = curl(f"{tls_edge.url}/v2/library/big/blobs/{layer.digest}", http2=http2, cacert=ca.cert_path)
        assert (got.status, got.http_version, got.headers["x-cache"]) == (200, version, expected_cache)
        assert sha256(got.body) == layer.digest and got.headers["content-length"] == str(len(layer.data))
    part = curl(
        f"{tls_edge.url}/v2/library/big/blobs/{layer.digest}",
        http2=http2,
        cacert=ca.cert_path,
        headers=("Range: bytes=1000-2000999",),
    )
    assert part.status == 206 and part.body == layer.data[1000:2001000]
    assert part.headers["content-range"] == f"bytes 1000-2000999/{len(layer.data)}"
    head = curl(
        f"{tls_edge.url}/v2/library/big/blobs/{layer.digest}", http2=http2, cacert=ca.cert_path, method="HEAD"
    )
    assert head.status == 200 and head.headers["content-length"] == str(len(layer.data)) and not head.body


def test_tls_offers_only_modern_protocols_and_both_alpn_protocols(tls_edge: EdgeProcess, ca: TestCA) -> None:
    port = int(tls_edge.url.rsplit(":", 1)[1])
    for alpn in ("h2", "http/1.1"):
        context = ssl.create_default_context(cafile=str(ca.cert_path))
        context.set_alpn_protocols([alpn])
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() == alpn
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            cipher = tls.cipher()
            assert cipher is not None and re.search("GCM|CHACHA20", cipher[0]), cipher
    tls12 = ssl.create_default_context(cafile=str(ca.cert_path))
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2  # the minimum still accepted
    with tls12.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="localhost"
    ) as tls:
        assert tls.version() == "TLSv1.2"
        cipher = tls.cipher()
        assert cipher is not None and re.search("GCM|CHACHA20", cipher[0]), cipher
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # that is the point
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, pytest.raises(ssl.SSLError):
        old.wrap_socket(raw, server_hostname="localhost")  # TLS 1.1 and older are refused
    cbc = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cbc.check_hostname, cbc.verify_mode = False, ssl.CERT_NONE
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE+AES+SHA1:ECDHE+AES+SHA256:!AESGCM")  # CBC suites only
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, pytest.raises(ssl.SSLError):
        cbc.wrap_socket(raw, server_hostname="localhost")


def test_h2load_multiplexes_many_streams_on_few_connections(tls_edge: EdgeProcess, ca: TestCA) -> None:
    h2load = shutil.which("h2load")
    assert h2load, "h2load (Debian nghttp2-client) is installed by tests/run"
    url = f"{tls_edge.url}/v2/library/alpine/manifests/latest"
    assert curl(url, http2=True, cacert=ca.cert_path, headers=(MANIFEST_ACCEPT,)).status == 200
    run = subprocess.run(
        [h2load, "-n", "2000", "-c", "4", "-m", "32", "-H", MANIFEST_ACCEPT.lower(), url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "Application protocol: h2" in run.stdout
    assert re.search(r"requests: 2000 total, 2000 started, 2000 done, 2000 succeeded", run.stdout), run.stdout
    assert re.search(r"status codes: 2000 2xx", run.stdout), run.stdout


def test_skopeo_copies_through_tls_with_a_cert_dir(
    tls_edge: EdgeProcess, ca: TestCA, seeded: Seeded, tmp_path: Path
) -> None:
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    shutil.copy(ca.cert_path, cert_dir / "ca.crt")  # skopeo reads *.crt in --src-cert-dir as CAs
    host = tls_edge.url.removeprefix("https://")
    copied = skopeo_copy_all(
        f"{host}/library/multi:v1", tmp_path / "multi", tls_verify=True, cert_dir=cert_dir
    )
    assert copied.manifest == seeded.multi.manifest.data
    for image in seeded.multi.images:
        assert copied.instances[image.manifest.digest] == image.manifest.data
        assert {b.digest for b in image.blobs} <= copied.blobs
    untrusted = tmp_path / "no-ca"
    untrusted.mkdir()
    with pytest.raises(Exception, match="certificate"):
        skopeo_copy_all(f"{host}/library/alpine:latest", tmp_path / "x", tls_verify=True, cert_dir=untrusted)


def serve_command(port: int, origin: Registry, tmp_path: Path, *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "edgecache", "serve", "--listen", f"127.0.0.1:{port}",
        "--upstream", origin.url, "--cache-dir", str(tmp_path / "cache"), *flags,
    ]  # fmt: skip


def test_start_refuses_an_expired_certificate_or_a_key_that_is_not_its_own(
    tmp_path: Path, origin: Registry, ca: TestCA
) -> None:
    expired = ca.issue("expired", valid_days=-1)
    other = ca.issue("other")
    wrong_key = Issued(ca.issue("mismatch").cert, other.key, 0)
    cases = [
        (expired, "expired on"),
        (wrong_key, "is not the private key of"),
    ]
    for issued, message in cases:
        command = serve_command(free_port(), origin, tmp_path, "--tls-cert", str(issued.cert))
        run = subprocess.run(
            [*command, "--tls-key", str(issued.key)], capture_output=True, text=True, timeout=30, check=False
        )
        assert run.returncode == 2 and message in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
    half = subprocess.run(
        [*serve_command(free_port(), origin, tmp_path, "--tls-cert", str(other.cert))],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert half.returncode == 2 and "set both" in half.stderr
    with socket.socket() as taken:  # the port is someone else's: one clear line, no Rust backtrace
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        flags = ("--tls-cert", str(other.cert), "--tls-key", str(other.key))
        run = subprocess.run(
            serve_command(port, origin, tmp_path, *flags),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert run.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in run.stderr
        assert "backtrace" not in run.stderr.lower()


def test_sighup_swaps_the_certificate_and_downloads_in_flight_finish(
    tmp_path: Path, origin: Registry, seeded: Seeded, ca: TestCA
) -> None:
    first, second, expired = ca.issue("first"), ca.issue("second"), ca.issue("late", valid_days=-1)
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live-key.pem"
    shutil.copy(first.cert, live_cert)
    shutil.copy(first.key, live_key)
    args = ("--tls-cert", str(live_cert), "--tls-key", str(live_key))
    with spawn_edge(tmp_path, origin.url, args=args, tls=True) as edge:
        port = int(edge.url.rsplit(":", 1)[1])
        assert served_serial(port) == first.serial
        layer = seeded.big.layers[-1]
        url = f"{edge.url}/v2/library/big/blobs/{layer.digest}"
        assert curl(url, cacert=ca.cert_path).status == 200  # cached now
        slow = [
            subprocess.Popen(
                ["curl", "-sS", "--cacert", str(ca.cert_path), version, "--limit-rate", "3M", "-o", "-", url],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for version in ("--http1.1", "--http2")
        ]
        # Both downloads are under way (~8 s each at 3 MB/s): their first bytes have arrived.
        started = []
        for download in slow:
            assert download.stdout is not None
            started.append(download.stdout.read(64 * 1024))
            assert len(started[-1]) == 64 * 1024, download.stderr.read() if download.stderr else ""
        shutil.copy(second.cert, live_cert)
        shutil.copy(second.key, live_key)
        edge.proc.send_signal(signal.SIGHUP)
        # The new worker starts, then the old one stops accepting (a few seconds later); from then
        # on every new connection gets the new certificate.
        wait_for_serial(port, second.serial)
        for download, head in zip(slow, started, strict=True):
            out, err = download.communicate(timeout=60)
            assert download.returncode == 0, err
            assert sha256(head + out) == layer.digest  # the connections in flight were not dropped

        shutil.copy(expired.cert, live_cert)
        shutil.copy(expired.key, live_key)
        edge.proc.send_signal(signal.SIGHUP)
        # The handling of this SIGHUP is over once its "configuration reloaded" line (the second) is
        # written: the certificate check refused the pair before that, and no reload was started.
        wait_until_sync(
            lambda: edge.log_path.read_text().count("configuration reloaded") >= 2,
            message="the second SIGHUP was not handled",
        )
        log = edge.log_path.read_text()
        assert "not reloaded" in log and "expired on" in log
        # A bad certificate is refused, the old one stays: for every new connection.
        assert [served_serial(port) for _ in range(5)] == [second.serial] * 5
        assert edge.proc.poll() is None


async def test_a_failed_fill_cuts_the_http2_stream_before_its_last_byte(
    tmp_path: Path, origin: Registry, seeded: Seeded, ca: TestCA
) -> None:
    proxy = await FaultProxy(origin.url).start()
    server = ca.issue("edge")
    layer = seeded.big.layers[-1]
    corrupt = bytearray(layer.data)
    corrupt[-10] ^= 0xFF  # right length, wrong bytes: only the digest check at the end can tell
    proxy.rules.replace_body[f"/blobs/{layer.digest}"] = bytes(corrupt)
    args = ("--tls-cert", str(server.cert), "--tls-key", str(server.key))
    try:
        with spawn_edge(tmp_path, proxy.url, args=args, tls=True) as edge:
            url = f"{edge.url}/v2/library/big/blobs/{layer.digest}"
            got = await asyncio.to_thread(curl, url, http2=True, cacert=ca.cert_path)
            assert got.returncode != 0  # curl reports the reset stream: the client retries
            assert len(got.body) < len(layer.data) and sha256(got.body) != layer.digest
            assert not list((edge.cache_dir / "blobs").rglob(layer.digest.split(":")[1]))
            again = await asyncio.to_thread(curl, url, http2=True, cacert=ca.cert_path)
            assert again.status == 502 or again.returncode != 0  # remembered briefly, never served
    finally:
        await proxy.stop()


def test_sigterm_stops_within_the_grace_even_with_a_slow_download(
    tmp_path: Path, origin: Registry, seeded: Seeded, ca: TestCA, server_cert: Issued
) -> None:
    args = ("--tls-cert", str(server_cert.cert), "--tls-key", str(server_cert.key))
    with spawn_edge(tmp_path, origin.url, args=args, tls=True) as edge:
        layer = seeded.big.layers[-1]
        url = f"{edge.url}/v2/library/big/blobs/{layer.digest}"
        assert curl(url, cacert=ca.cert_path, http2=True).status == 200
        received = tmp_path / "slow-download"
        slow = subprocess.Popen(  # ~25 s at 1 MB/s: longer than the 10 s grace
            [
                "curl",
                "-sS",
                "--http2",
                "--cacert",
                str(ca.cert_path),
                "--limit-rate",
                "1M",
                "-o",
                str(received),
                url,
            ],
            stderr=subprocess.PIPE,
        )
        wait_until_sync(lambda: received.stat().st_size > 0, message="the slow download did not start")
        stopping = time.monotonic()
        edge.proc.send_signal(signal.SIGTERM)
        assert edge.proc.wait(timeout=30) == 0
        # The grace (10 s), not the download (~24 s more), bounds the stop: the bound is the point,
        # wide enough above the grace for a loaded machine and still far below the download.
        assert time.monotonic() - stopping < 18
        slow.communicate(timeout=30)
        assert "edgecache stopped" in edge.log_path.read_text()


@pytest.fixture(scope="module")
def huge(origin: Registry) -> Image:
    """A 96 MiB layer: long enough that a client leaving after 1 MiB leaves most of it unsent."""
    image = build_image("huge", random_bytes=96 * 1024 * 1024)
    Pusher(origin.url).push_image("library/huge", "latest", image)
    return image


@pytest.mark.parametrize("http2", [True, False], ids=["http2", "http1.1"])
def test_a_client_that_leaves_stops_the_sending(
    tmp_path: Path,
    origin: Registry,
    seeded: Seeded,
    huge: Image,
    ca: TestCA,
    server_cert: Issued,
    http2: bool,
) -> None:
    args = ("--tls-cert", str(server_cert.cert), "--tls-key", str(server_cert.key))
    layer = huge.layers[-1]
    with spawn_edge(tmp_path, origin.url, args=args, tls=True) as edge:
        url = f"{edge.url}/v2/library/huge/blobs/{layer.digest}"
        version = "--http2" if http2 else "--http1.1"
        hex_digest = layer.digest.split(":", 1)[1]
        stored = edge.cache_dir / "blobs/sha256" / hex_digest[:2] / hex_digest

        def blob_records() -> list[dict[str, object]]:
            return [r for r in access_records(edge.log_path) if r["route"] == "blob"]

        # A fill in progress (spool), then a range of the stored blob (chunks): read 1 MiB, hang up.
        for extra in ((), ("-r", f"100-{len(layer.data) - 1}")):
            before = len(blob_records())
            command = ["curl", "-sS", version, "--cacert", str(ca.cert_path), *extra, url]
            with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as reader:
                assert reader.stdout is not None
                assert len(reader.stdout.read(1024 * 1024)) == 1024 * 1024
                reader.kill()
            # The server saw the client leave (the response is logged), and the fill went on: the
            # blob is stored, so the next request is served from the store.
            wait_until_sync(
                lambda before=before: len(blob_records()) > before,
                message="the left response is not logged",
            )
            wait_until_sync(stored.exists, message="the fill did not go on to the store")
        sent = [r["bytes"] for r in blob_records()]
        assert len(sent) == 2 and all(n < len(layer.data) // 2 for n in sent), sent
        assert "transport error" not in edge.log_path.read_text()
        assert curl(url, cacert=ca.cert_path, http2=http2).status == 200  # the fill itself went on
