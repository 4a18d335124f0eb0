"""The shared object-storage tier (issue 16) against a real Ceph RADOS Gateway (tests/support/ceph.py)
and the real origin registry: a node with an empty disk pulls from the bucket, not the upstream; a
gateway that dies, or an object that is corrupt, never costs a client its pull; a bucket that does
not exist stops the start. Upstream work is counted in the origin's access log."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import obstore
import pytest
from obstore.store import S3Store

from edgecache.app import Edgecache
from edgecache.config import Config, SharedConfig
from edgecache.errors import ConfigError
from tests.conftest import Edge, Seeded, edge_config, running_edge
from tests.support.ceph import ACCESS_KEY, SECRET_KEY, Ceph, start_ceph
from tests.support.images import Image
from tests.support.registry import Registry, free_port
from tests.support.tcpfault import TcpFault
from tests.support.waiting import wait_until


@pytest.fixture(scope="module")
def ceph() -> Iterator[Ceph]:
    cluster = start_ceph()
    yield cluster
    cluster.stop()


@pytest.fixture
def bucket(ceph: Ceph) -> str:
    """A fresh bucket per test: tests share the cluster, never objects."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    ceph.create_bucket(name)
    return name


def credentials_file(tmp_path: Path) -> Path:
    path = tmp_path / "s3-credentials"
    path.write_text(f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n")
    return path


def shared_config(
    tmp_path: Path, origin: Registry, ceph: Ceph, bucket: str, node: str, **shared: object
) -> Config:
    config = edge_config(tmp_path / node, origin.url)
    tier = SharedConfig(
        endpoint=ceph.endpoint,
        bucket=bucket,
        prefix="dc1/",
        credentials_file=str(credentials_file(tmp_path)),
        connect_timeout=1.0,
        header_timeout=2.0,
        stall_timeout=2.0,
        **shared,  # type: ignore[arg-type]
    )
    return dataclasses.replace(config, shared=tier)


def store_of(ceph: Ceph, bucket: str) -> S3Store:
    """The test's own view of the bucket (obstore, as edgecache uses it)."""
    return S3Store(
        bucket, endpoint=ceph.endpoint, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
        region="us-east-1", virtual_hosted_style_request=False, client_options={"allow_http": True},
    )  # fmt: skip


def key(kind: str, digest: str) -> str:
    return f"dc1/{kind}/sha256/{digest.split(':', 1)[1]}"


async def pull(edge: Edge, repo: str, tag: str, image: Image) -> None:
    """What a client does: the manifest by tag, then the config and each layer, every byte checked."""
    async with edge.http.get(
        f"/v2/{repo}/manifests/{tag}", headers={"Accept": image.manifest.media_type}
    ) as resp:
        assert resp.status == 200, await resp.text()
        assert await resp.read() == image.manifest.data
    for blob in image.blobs:
        async with edge.http.get(f"/v2/{repo}/blobs/{blob.digest}") as resp:
            assert resp.status == 200, await resp.text()
            assert await resp.read() == blob.data


async def uploads_settled(edge: Edge) -> None:
    tier = edge.instance.shared
    assert tier is not None
    await edge.instance.flights.settled()
    await tier.uploads.settled()


def blob_gets(origin: Registry, image: Image) -> int:
    return sum(origin.count("GET", f"/blobs/{blob.digest}") for blob in image.blobs)


@pytest.fixture
async def node_pair(
    tmp_path: Path, origin: Registry, seeded: Seeded, ceph: Ceph, bucket: str
) -> AsyncIterator[tuple[Edge, Edge]]:
    async with (
        running_edge(shared_config(tmp_path, origin, ceph, bucket, "one")) as one,
        running_edge(shared_config(tmp_path, origin, ceph, bucket, "two")) as two,
    ):
        yield one, two


async def test_an_empty_node_pulls_from_the_bucket_not_the_upstream(
    node_pair: tuple[Edge, Edge], origin: Registry, seeded: Seeded, ceph: Ceph, bucket: str
) -> None:
    one, two = node_pair
    image = seeded.alpine
    before = blob_gets(origin, image)
    await pull(one, "library/alpine", "latest", image)
    assert blob_gets(origin, image) == before + len(image.blobs)
    await uploads_settled(one)
    assert await one.metric("edgecache_shared_uploads_total", kind="blob", result="done") == len(image.blobs)
    assert await one.metric("edgecache_shared_uploads_total", kind="manifest", result="done") == 1
    store = store_of(ceph, bucket)
    for blob in image.blobs:  # named by digest under the prefix, the exact bytes
        got = await obstore.get_async(store, key("blobs", blob.digest))
        assert bytes(await got.bytes_async()) == blob.data
    assert await obstore.head_async(store, key("manifests", image.manifest.digest))

    heads = origin.count("HEAD", "/blobs/")
    await pull(two, "library/alpine", "latest", image)
    assert blob_gets(origin, image) == before + len(image.blobs), "node two fetched a blob upstream"
    # The manifest named the blobs: no HEAD was needed to confirm the repository holds them.
    assert origin.count("HEAD", "/blobs/") == heads
    assert await two.metric("edgecache_shared_hits_total", kind="blob") == len(image.blobs)
    assert await two.metric("edgecache_shared_read_bytes_total") >= sum(len(b.data) for b in image.blobs)
    # Not counted as upstream bytes, and not uploaded back.
    assert await two.metric("edgecache_upstream_bytes_total", upstream="docker.io") == 0
    await uploads_settled(two)
    assert await two.metric("edgecache_shared_uploads_total", kind="blob", result="done") == 0
    # Stored on node two's disk: the next pull there is a local hit.
    async with two.http.get(f"/v2/library/alpine/blobs/{image.layers[-1].digest}") as resp:
        assert resp.headers["X-Cache"] == "HIT"


async def test_a_manifest_by_digest_comes_from_the_bucket(
    node_pair: tuple[Edge, Edge], origin: Registry, seeded: Seeded
) -> None:
    one, two = node_pair
    index = seeded.multi
    amd64 = index.images[0].manifest
    async with one.http.get(f"/v2/library/multi/manifests/sha256:{amd64.digest.split(':')[1]}",
                            headers={"Accept": amd64.media_type}) as resp:  # fmt: skip
        assert resp.status == 200
    await uploads_settled(one)
    gets = origin.count("GET", f"/manifests/{amd64.digest}")
    async with two.http.get(
        f"/v2/library/multi/manifests/{amd64.digest}", headers={"Accept": amd64.media_type}
    ) as resp:
        assert resp.status == 200
        assert await resp.read() == amd64.data
        assert resp.headers["Content-Type"] == amd64.media_type
    assert origin.count("GET", f"/manifests/{amd64.digest}") == gets
    assert await two.metric("edgecache_shared_hits_total", kind="manifest") == 1


async def test_a_corrupt_object_is_never_served_and_the_pull_succeeds_from_upstream(
    node_pair: tuple[Edge, Edge], origin: Registry, seeded: Seeded, ceph: Ceph, bucket: str
) -> None:
    one, two = node_pair
    image = seeded.app
    layer = image.layers[-1]
    await pull(one, "team/app", "1.0", image)
    await uploads_settled(one)
    store = store_of(ceph, bucket)
    # Same length, one byte changed: only the digest can tell.
    bad = bytearray(layer.data)
    bad[len(bad) // 2] ^= 0xFF
    await obstore.put_async(store, key("blobs", layer.digest), bytes(bad))
    before = origin.count("GET", f"/blobs/{layer.digest}")

    await pull(two, "team/app", "1.0", image)  # every byte checked: the right ones

    assert origin.count("GET", f"/blobs/{layer.digest}") == before + 1
    assert await two.metric("edgecache_shared_errors_total", kind="corrupt") == 1
    # The wrong object was deleted and the verified fill uploaded in its place.
    await uploads_settled(two)
    got = await obstore.get_async(store, key("blobs", layer.digest))
    assert bytes(await got.bytes_async()) == layer.data


async def test_a_corrupt_manifest_in_the_bucket_is_skipped(
    node_pair: tuple[Edge, Edge], origin: Registry, seeded: Seeded, ceph: Ceph, bucket: str
) -> None:
    _one, two = node_pair
    manifest = seeded.multi.images[1].manifest
    await obstore.put_async(store_of(ceph, bucket), key("manifests", manifest.digest), b'{"not": "it"}')
    async with two.http.get(f"/v2/library/multi/manifests/{manifest.digest}",
                            headers={"Accept": manifest.media_type}) as resp:  # fmt: skip
        assert resp.status == 200
        assert await resp.read() == manifest.data
    assert await two.metric("edgecache_shared_errors_total", kind="corrupt") == 1


async def test_a_dead_gateway_costs_no_client_its_pull(
    node_pair: tuple[Edge, Edge], origin: Registry, seeded: Seeded, ceph: Ceph
) -> None:
    one, two = node_pair
    image = seeded.big
    await pull(one, "library/big", "latest", image)
    await uploads_settled(one)
    ceph.stop_rgw()
    try:
        before = blob_gets(origin, image)
        await pull(two, "library/big", "latest", image)  # the bucket refuses: the upstream serves
        assert blob_gets(origin, image) == before + len(image.blobs)
        assert await two.metric("edgecache_shared_errors_total", kind="unavailable") >= 1
        # Down after `down_after` failures (3): further misses skip it at once, uploads are skipped.
        await pull(two, "library/alpine", "3.19", seeded.alpine)
        assert await two.metric("edgecache_shared_up") == 0
        await uploads_settled(two)
        skipped = await two.metric("edgecache_shared_uploads_total", kind="blob", result="down")
        failed = await two.metric("edgecache_shared_uploads_total", kind="blob", result="failed")
        assert skipped + failed >= 1
    finally:
        ceph.start_rgw()

    async def back() -> bool:  # a probe (after 1 s, then 2 s, ...) finds it answering again
        return await two.metric("edgecache_shared_up") == 1

    await wait_until(back, timeout=30, message="the shared tier did not come back after radosgw restarted")


async def test_a_missing_bucket_or_wrong_credentials_stop_the_start(
    tmp_path: Path, origin: Registry, ceph: Ceph, bucket: str
) -> None:
    config = shared_config(tmp_path, origin, ceph, "no-such-bucket", "n1")
    instance = Edgecache.build(config)
    try:
        with pytest.raises(ConfigError, match="no such bucket"):
            await instance.start()
    finally:
        instance.lock.release()
    wrong = tmp_path / "wrong"
    wrong.write_text("[default]\naws_access_key_id = nobody\naws_secret_access_key = wrong\n")
    config = shared_config(tmp_path, origin, ceph, bucket, "n2")
    config = dataclasses.replace(
        config, shared=dataclasses.replace(config.shared, credentials_file=str(wrong))
    )
    instance = Edgecache.build(config)
    try:
        with pytest.raises(ConfigError, match="refused our credentials") as raised:
            await instance.start()
        assert "wrong" not in str(raised.value) and SECRET_KEY not in str(raised.value)
    finally:
        instance.lock.release()


async def test_an_unreachable_gateway_at_start_up_is_an_outage_not_a_config_error(
    tmp_path: Path, origin: Registry, seeded: Seeded, ceph: Ceph, bucket: str
) -> None:
    """Nothing listens where the gateway should be: the node starts with the tier down, serves
    from the upstream, and says so in /readyz (a Ceph outage at boot must not stop every edge)."""
    config = shared_config(tmp_path, origin, ceph, bucket, "n1")
    config = dataclasses.replace(
        config, shared=dataclasses.replace(config.shared, endpoint=f"http://127.0.0.1:{free_port()}")
    )
    async with running_edge(config) as edge:
        assert await edge.metric("edgecache_shared_up") == 0
        assert await edge.metric("edgecache_shared_errors_total", kind="unavailable") == 1
        async with edge.http.get("/readyz") as resp:
            assert resp.status == 200 and (await resp.json())["shared_tier"] == "down"
        await pull(edge, "library/alpine", "latest", seeded.alpine)


async def test_concurrent_pulls_through_a_cold_node_share_one_bucket_read(
    node_pair: tuple[Edge, Edge], origin: Registry, seeded: Seeded
) -> None:
    one, two = node_pair
    layer = seeded.big.layers[-1]
    async with one.http.get(f"/v2/library/big/blobs/{layer.digest}") as resp:
        assert await resp.read() == layer.data
    await uploads_settled(one)
    before = origin.count("GET", f"/blobs/{layer.digest}")

    async def get(start: int) -> bytes:
        headers = {"Range": f"bytes={start}-"} if start else {}
        async with two.http.get(f"/v2/library/big/blobs/{layer.digest}", headers=headers) as resp:
            assert resp.status == (206 if start else 200)
            return await resp.read()

    bodies = await asyncio.gather(*(get(i * 1000) for i in range(5)))
    assert all(body == layer.data[i * 1000 :] for i, body in enumerate(bodies))
    assert origin.count("GET", f"/blobs/{layer.digest}") == before
    assert await two.metric("edgecache_shared_hits_total", kind="blob") == 1


async def test_a_black_hole_or_a_stalled_bucket_is_skipped_within_its_deadlines(
    tmp_path: Path, origin: Registry, seeded: Seeded, ceph: Ceph, bucket: str
) -> None:
    host, port = ceph.endpoint.removeprefix("http://").split(":")
    fault = await TcpFault(host, int(port)).start()
    try:
        seed = shared_config(tmp_path, origin, ceph, bucket, "seed")
        faulty = shared_config(tmp_path, origin, ceph, bucket, "faulty")
        faulty = dataclasses.replace(faulty, shared=dataclasses.replace(faulty.shared, endpoint=fault.url))
        async with running_edge(seed) as one, running_edge(faulty) as two:
            await pull(one, "library/big", "latest", seeded.big)
            await pull(one, "team/app", "1.0", seeded.app)
            await uploads_settled(one)

            fault.stall_after = 64 * 1024  # a response that stops half-way: the stall deadline (2 s)
            before = blob_gets(origin, seeded.big)
            await pull(two, "library/big", "latest", seeded.big)
            assert blob_gets(origin, seeded.big) > before  # the upstream filled what the bucket did not
            assert await two.metric("edgecache_shared_errors_total", kind="timeout") >= 1
            assert await two.metric("edgecache_shared_up") == 0  # a missed deadline: down at once
            async with two.http.get("/readyz") as resp:  # reported, not required: still ready
                assert resp.status == 200
                assert (await resp.json())["shared_tier"] == "down"

            fault.stall_after, fault.hang = None, True  # and a black hole: skipped without asking it
            connections = fault.connections
            await pull(two, "team/app", "1.0", seeded.app)
            assert fault.connections == connections, "a down tier was asked"

            fault.hang = False

            async def back() -> bool:
                return await two.metric("edgecache_shared_up") == 1

            await wait_until(back, timeout=30, message="the probe did not bring the tier back")
    finally:
        await fault.stop()
