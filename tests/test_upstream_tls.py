"""An upstream on https, as every public registry is: blob bodies come over TLS on the upstream's
own threads, trusted through the configured CA bundle, and an untrusted certificate is a gateway
error that stores nothing. The origin is the real registry with its TLS listener, certificate from a
test CA."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import edge_config, running_edge
from tests.support.certs import TestCA
from tests.support.images import DOCKER_MANIFEST, Pusher, build_image
from tests.support.registry import start_registry

ACCEPT = {"Accept": DOCKER_MANIFEST}


async def test_an_https_upstream_is_pulled_with_its_ca_and_refused_without_it(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "pki")
    issued = ca.issue("origin")
    image = build_image("tls-origin", random_bytes=3 * 1024 * 1024)  # several reads of a MiB
    layer = image.layers[-1]
    seeding = start_registry(tmp_path / "origin")  # pushed over plain HTTP, served over TLS below
    try:
        Pusher(seeding.url).push_image("team/app", "v1", image)
    finally:
        seeding.stop()
    tls = f"  tls:\n    certificate: {issued.cert}\n    key: {issued.key}\n"
    origin = start_registry(tmp_path / "origin", tls)
    try:
        assert origin.url.startswith("https://")
        trusted = edge_config(tmp_path / "cache", origin.url, upstream={"ca_bundle": str(ca.cert_path)})
        async with running_edge(trusted) as edge:
            async with edge.http.get("/v2/team/app/manifests/v1", headers=ACCEPT) as resp:
                assert resp.status == 200 and await resp.read() == image.manifest.data
            for expected in ("MISS", "HIT"):
                async with edge.http.get(f"/v2/team/app/blobs/{layer.digest}") as resp:
                    assert resp.status == 200
                    assert await resp.read() == layer.data
                    assert resp.headers["X-Cache"] == expected
                await edge.instance.flights.settled()
            assert origin.count("GET", layer.digest) == 1

        untrusted = edge_config(tmp_path / "cache2", origin.url)  # the system's CAs only
        async with running_edge(untrusted) as edge:
            async with edge.http.get(f"/v2/team/app/blobs/{layer.digest}") as resp:
                assert resp.status == 502
                assert json.loads(await resp.read())["errors"][0]["code"] == "UNAVAILABLE"
            assert origin.count("GET", layer.digest) == 1  # the handshake failed: no request was made
            assert not list((tmp_path / "cache2" / "blobs").rglob("*/*/*"))
    finally:
        origin.stop()
