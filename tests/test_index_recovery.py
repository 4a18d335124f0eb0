"""A lost or corrupt index costs nothing the disk can tell (issue 15). Real processes, real files.

`python -m edgecache serve` caches images through a recording proxy in front of the origin, stops;
the index (and in one case the tag files) is deleted or overwritten with garbage; the proxy stops too,
so the upstream refuses connections; edgecache starts again on the same cache. What a client sees is
checked (status, bytes hashed against the digest), and what reached the upstream.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import EdgeProcess, Seeded, spawn_edge
from tests.support.faults import FaultProxy
from tests.support.images import DOCKER_MANIFEST, OCI_MANIFEST
from tests.support.waiting import wait_until

ACCEPT = {"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"}
ANONYMOUS_RULE = '[[access.rules]]\nidentity = "anonymous"\nallow = ["docker.io/*"]\n'


async def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.request(method, url, headers=ACCEPT) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


def sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


async def metric(edge: EdgeProcess, name: str, **labels: str) -> float:
    _, _, body = await get(f"{edge.url}/metrics")
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def fill_cache(tmp_path: Path, proxy: FaultProxy, seeded: Seeded, config: str) -> int:
    """Cache alpine by its tag, and team/app's layers by digest alone (no manifest, no tag: facts
    only the index knew). Returns how many digests are stored."""
    with spawn_edge(tmp_path, proxy.url, config=config) as edge:
        status, _, _ = await get(f"{edge.url}/v2/library/alpine/manifests/latest")
        assert status == 200
        for blob in seeded.alpine.blobs:
            assert (await get(f"{edge.url}/v2/library/alpine/blobs/{blob.digest}"))[0] == 200
        for blob in seeded.app.layers:
            assert (await get(f"{edge.url}/v2/team/app/blobs/{blob.digest}"))[0] == 200

        def stored() -> bool:
            found = [p for sub in ("blobs", "manifests") for p in (edge.cache_dir / sub).rglob("*")]
            return len([p for p in found if p.is_file()]) == 1 + len(seeded.alpine.blobs) + len(
                seeded.app.layers
            )

        await wait_until(stored, message="the pulled content was not all stored")
    return 1 + len(seeded.alpine.blobs) + len(seeded.app.layers)


def damage(cache: Path, how: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{cache / 'index.db'}{suffix}").unlink(missing_ok=True)
    if how == "garbage":
        (cache / "index.db").write_bytes(b"\x00not a database\xff" * 300)
    if how == "lost with tags":
        shutil.rmtree(cache / "tags")


async def test_unchecked_a_lost_index_and_tags_still_serve_every_stored_digest_under_any_name(
    tmp_path: Path, proxy: FaultProxy, seeded: Seeded
) -> None:
    """Anonymous access, no rules, no upstream credentials: the repository check protects nothing,
    so every stored digest is served, under any repository name, with the upstream refusing."""
    stored = await fill_cache(tmp_path, proxy, seeded, config="")
    damage(tmp_path / "cache", "lost with tags")
    port = int(proxy.url.rsplit(":", 1)[1])
    await proxy.stop()  # the upstream now refuses connections
    proxy.seen.clear()
    with spawn_edge(tmp_path, proxy.url) as edge:
        for repo in ("library/alpine", "team/app", "someone/else"):
            for blob in [*seeded.alpine.blobs, *seeded.app.layers]:
                status, headers, body = await get(f"{edge.url}/v2/{repo}/blobs/{blob.digest}")
                assert status == 200 and headers["X-Cache"] == "HIT"
                assert sha256(body) == blob.digest
                status, headers, _ = await get(f"{edge.url}/v2/{repo}/blobs/{blob.digest}", "HEAD")
                assert status == 200 and int(headers["Content-Length"]) == len(blob.data)
            status, headers, body = await get(
                f"{edge.url}/v2/{repo}/manifests/{seeded.alpine.manifest.digest}"
            )
            assert status == 200 and sha256(body) == seeded.alpine.manifest.digest
        # A tag cannot be rebuilt (what it pointed at was only in tags/): upstream is needed, and down.
        status, _, body = await get(f"{edge.url}/v2/library/alpine/manifests/latest")
        assert status in (502, 503) and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
        assert await metric(edge, "edgecache_unheld_digests") == stored
        assert await metric(edge, "edgecache_index_rebuilds_total", reason="missing") == 1
        log = edge.log_path.read_text()
        assert log.count("rebuilt from the store") == 1
        assert "repository checks off for docker.io" in log
        # The upstream comes back: the tag is served again, and the stored digests still ask nothing.
        await FaultProxy.start(proxy, port=port)

        async def tag_back() -> bool:
            return (await get(f"{edge.url}/v2/library/alpine/manifests/latest"))[0] == 200

        await wait_until(tag_back, message="the tag was not served once upstream was back")
        for blob in seeded.app.layers:
            assert (await get(f"{edge.url}/v2/other/name/blobs/{blob.digest}"))[0] == 200
        assert not [s for s in proxy.seen if "/blobs/" in s.path_qs]


@pytest.mark.parametrize("guard", ["access rule", "upstream credentials"])
async def test_checked_lost_facts_stay_fail_closed_until_upstream_confirms(
    tmp_path: Path,
    proxy: FaultProxy,
    seeded: Seeded,
    monkeypatch: pytest.MonkeyPatch,
    guard: str,
) -> None:
    """Where the repository check protects something, a corrupt index is moved aside and rebuilt; what
    tags/ and stored manifests tell is recovered and served while upstream refuses; a digest whose
    facts were lost is not served from cache until upstream confirms its repository holds it."""
    config = ANONYMOUS_RULE if guard == "access rule" else ""
    if guard == "upstream credentials":
        monkeypatch.setenv("EDGECACHE_UPSTREAM_USERNAME", "mirror")
        monkeypatch.setenv("EDGECACHE_UPSTREAM_PASSWORD_ENV", "EC_TEST_PW")
        monkeypatch.setenv("EC_TEST_PW", "mirror-pw")
    await fill_cache(tmp_path, proxy, seeded, config=config)
    cache = tmp_path / "cache"
    damage(cache, "garbage")
    port = int(proxy.url.rsplit(":", 1)[1])
    await proxy.stop()
    proxy.seen.clear()
    with spawn_edge(tmp_path, proxy.url, config=config) as edge:
        assert len(list(cache.glob("index.db.corrupt-*"))) == 1  # kept for a post-mortem
        # Recovered from tags/ and the stored manifest: alpine's tag, manifest and blobs.
        status, _, body = await get(f"{edge.url}/v2/library/alpine/manifests/latest")
        assert status == 200 and sha256(body) == seeded.alpine.manifest.digest
        for blob in seeded.alpine.blobs:
            status, headers, body = await get(f"{edge.url}/v2/library/alpine/blobs/{blob.digest}")
            assert status == 200 and headers["X-Cache"] == "HIT" and sha256(body) == blob.digest
        # Lost: team/app's layers were known by digest alone; and alpine's under another name.
        for repo, blob in [("team/app", b) for b in seeded.app.layers] + [
            ("someone/else", seeded.alpine.layers[-1])
        ]:
            for method in ("GET", "HEAD"):
                status, _, body = await get(f"{edge.url}/v2/{repo}/blobs/{blob.digest}", method)
                assert status in (502, 503), (repo, method, status)
                assert blob.data not in body
        assert await metric(edge, "edgecache_unheld_digests") == len(seeded.app.layers)
        assert await metric(edge, "edgecache_index_rebuilds_total", reason="corrupt") == 1
        log = edge.log_path.read_text()
        assert log.count("rebuilt from the store") == 1 and log.count("moved aside") == 1
        assert "repository checks off" not in log
        # The upstream is back: it confirms team/app holds its layers (HEAD), then they are hits.
        await FaultProxy.start(proxy, port=port)
        layer = seeded.app.layers[0]

        async def confirmed() -> bool:
            return (await get(f"{edge.url}/v2/team/app/blobs/{layer.digest}"))[0] == 200

        await wait_until(confirmed, message="team/app's layer was not served once upstream was back")
        status, headers, body = await get(f"{edge.url}/v2/team/app/blobs/{layer.digest}")
        assert status == 200 and headers["X-Cache"] == "HIT" and sha256(body) == layer.digest
        asked = [(s.method, s.path_qs) for s in proxy.seen if "/blobs/" in s.path_qs]
        assert ("HEAD", f"/v2/team/app/blobs/{layer.digest}") in asked
        assert ("GET", f"/v2/team/app/blobs/{layer.digest}") not in asked  # served from the cache
