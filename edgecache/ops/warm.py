"""`edgecache warm REF...`: pull images into the cache before anyone asks, through the same
single-flight path a client uses (it *is* a client: plain HTTP requests to an edgecache).

Against a running instance (`--url`), or on a cache directory directly: then an instance is started
in this process on a loopback port for the duration. Indexes are walked for the chosen platforms.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp

from edgecache.config import Config
from edgecache.errors import ConfigError, DigestInvalid, NameInvalid, TagInvalid
from edgecache.oci import MANIFEST_MEDIA_TYPES, Digest, RepoName, parse_reference, split_image_name

ACCEPT = ", ".join(MANIFEST_MEDIA_TYPES)
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


@dataclass(frozen=True)
class ImageRef:
    registry: str
    repository: str
    reference: str  # tag or digest

    def __str__(self) -> str:
        sep = "@" if ":" in self.reference else ":"
        return f"{self.registry}/{self.repository}{sep}{self.reference}"


def parse_ref(text: str) -> ImageRef:
    """`[registry/]repository[:tag|@digest]`, read the way docker reads image names."""
    name, at, digest = text.partition("@")
    tag = ""
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, _, tag = name.rpartition(":")
    registry, repository = split_image_name(name)
    reference = digest if at else (tag or "latest")
    try:
        RepoName.parse(repository)
        parse_reference(reference)
    except (NameInvalid, TagInvalid, DigestInvalid) as exc:
        raise ConfigError(f"{text!r}: {exc.detail}") from None
    return ImageRef(registry, repository, reference)


@dataclass
class Summary:
    images: int = 0
    blobs: int = 0
    fetched_bytes: int = 0
    cached_bytes: int = 0
    failures: list[str] = field(default_factory=list)
    failed: set[str] = field(default_factory=set)  # references not warmed (refused by policy, or failing)


class Warmer:
    def __init__(self, http: aiohttp.ClientSession, platforms: list[str], concurrency: int) -> None:
        self._http = http
        self._platforms = platforms
        self._slots = asyncio.Semaphore(concurrency)
        self.summary = Summary()
        self._seen: set[str] = set()

    async def warm(self, ref: ImageRef) -> None:
        try:
            await self._manifest(ref, ref.reference, top=True)
            self.summary.images += 1
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            # A refusal (an access rule, or the signature policy's 403/503) is reported with the
            # message edgecache gave, and the reference is not pinned by `warm --pin`.
            self.summary.failures.append(f"{ref}: {exc}")
            self.summary.failed.add(str(ref))

    async def _manifest(self, ref: ImageRef, reference: str, top: bool) -> None:
        body, media_type = await self._get_manifest(ref, reference)
        doc = json.loads(body)
        if media_type in INDEX_TYPES or "manifests" in doc:
            children = [m for m in doc.get("manifests", []) if self._wanted(m.get("platform"))]
            await asyncio.gather(
                *(self._manifest(ref, str(Digest.parse(m["digest"])), False) for m in children)
            )
            return
        digests = [doc["config"]["digest"], *(layer["digest"] for layer in doc.get("layers", []))]
        await asyncio.gather(*(self._blob(ref, str(Digest.parse(d))) for d in digests))

    def _wanted(self, platform: object) -> bool:
        if not isinstance(platform, dict):
            return False
        name = f"{platform.get('os')}/{platform.get('architecture')}"
        return "all" in self._platforms or name in self._platforms

    async def _get_manifest(self, ref: ImageRef, reference: str) -> tuple[bytes, str]:
        url = f"/v2/{ref.repository}/manifests/{reference}"
        async with (
            self._slots,
            self._http.get(url, params={"ns": ref.registry}, headers={"Accept": ACCEPT}) as resp,
        ):
            if resp.status != 200:
                raise ValueError(f"manifest {reference}: HTTP {resp.status} {(await resp.text())[:200]}")
            return await resp.read(), resp.headers.get("Content-Type", "")

    async def _blob(self, ref: ImageRef, digest: str) -> None:
        if digest in self._seen:
            return
        self._seen.add(digest)
        async with (
            self._slots,
            self._http.get(f"/v2/{ref.repository}/blobs/{digest}", params={"ns": ref.registry}) as resp,
        ):
            if resp.status != 200:
                raise ValueError(f"blob {digest}: HTTP {resp.status}")
            size = 0
            async for chunk in resp.content.iter_chunked(1 << 20):
                size += len(chunk)
            cached = resp.headers.get("X-Cache") == "HIT"
        self.summary.blobs += 1
        if cached:
            self.summary.cached_bytes += size
        else:
            self.summary.fetched_bytes += size
        print(
            f"\r{self.summary.blobs} blobs, {self.summary.fetched_bytes / 2**20:.1f} MiB fetched",
            end="",
            file=sys.stderr,
            flush=True,
        )


@contextlib.asynccontextmanager
async def _local_instance(config: Config) -> AsyncIterator[str]:
    """An edgecache on the cache directory, on a free loopback port, for the duration of the warm."""
    from aiohttp import web

    from edgecache.app import Edgecache

    instance = Edgecache.build(config)
    await instance.start()
    runner = web.ServerRunner(web.Server(instance.web_handler(), access_log=None))
    try:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}"
    finally:
        await instance.flights.settled()
        await runner.cleanup()
        await instance.close()


async def run(
    refs: list[ImageRef], *, url: str | None, config: Config, platforms: list[str], concurrency: int
) -> Summary:
    async with contextlib.AsyncExitStack() as stack:
        base = url or await stack.enter_async_context(_local_instance(config))
        timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
        http = await stack.enter_async_context(
            aiohttp.ClientSession(base, timeout=timeout, auto_decompress=False)
        )
        warmer = Warmer(http, platforms, concurrency)
        await asyncio.gather(*(warmer.warm(ref) for ref in refs))
        print(file=sys.stderr)
        return warmer.summary
