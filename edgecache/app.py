"""Composition root: builds every part from the config, runs the listeners, shuts down cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from edgecache.accesslog import AccessLogger
from edgecache.blobstore import BlobStore, CacheDirLock
from edgecache.config import Config, parse_size
from edgecache.eviction import CacheKeeper
from edgecache.flights import Flights
from edgecache.manifests import ManifestCache
from edgecache.metrics import Metrics
from edgecache.pull import PullService
from edgecache.upstream import UpstreamClient
from edgecache.usage import Usage
from edgecache.web import RegistryFront, Upstreams

log = logging.getLogger("edgecache")
RUNNER_OPTIONS: dict[str, Any] = {"access_log_class": AccessLogger, "shutdown_timeout": 10.0}


@dataclass
class Edgecache:
    """Everything one running instance owns; `start()` and `close()` bracket its life."""

    config: Config
    lock: CacheDirLock
    store: BlobStore
    metrics: Metrics
    keeper: CacheKeeper
    flights: Flights
    clients: dict[str, UpstreamClient]
    front: RegistryFront
    log_format: str = "text"
    _started: bool = field(default=False, repr=False)

    @classmethod
    def build(cls, config: Config, log_format: str = "text") -> Edgecache:
        root = Path(config.cache.dir).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        lock = CacheDirLock(root)
        lock.acquire()
        metrics = Metrics(u.name for u in config.upstreams)
        store = BlobStore(root)
        store.prepare()
        keeper = CacheKeeper(
            store,
            metrics,
            max_size=parse_size(config.cache.max_size, "cache.max_size"),
            high_watermark=config.cache.high_watermark,
            low_watermark=config.cache.low_watermark,
            min_free=parse_size(config.cache.min_free, "cache.min_free"),
        )
        clients = {u.name: UpstreamClient(u, metrics) for u in config.upstreams}
        flights = Flights(
            store,
            metrics,
            keeper,
            negative_ttl=config.cache.negative_ttl,
            cancel_abandoned=config.cache.abandoned_fills == "cancel",
        )
        pull = PullService(
            store,
            ManifestCache(store),
            flights,
            metrics,
            keeper,
            tag_ttl=config.cache.tag_ttl,
            max_stale=config.cache.max_stale,
            stale_while_revalidate=config.cache.stale_while_revalidate,
            negative_ttl=config.cache.negative_ttl,
        )
        readiness = Readiness(store, clients)
        front = RegistryFront(pull, Upstreams(clients, config.default_upstream), metrics, Usage(), readiness)
        return cls(config, lock, store, metrics, keeper, flights, clients, front, log_format)

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        await self.keeper.start()
        for client in self.clients.values():
            await client.start()

    async def close(self) -> None:
        await self.flights.close()
        for client in self.clients.values():
            await client.close()
        await self.keeper.close()
        self.lock.release()

    def web_app(self) -> web.Application:
        app = self.front.build_app(admin=not self.config.server.metrics_listen, log_format=self.log_format)

        async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
            await self.start()
            yield
            await self.close()

        app.cleanup_ctx.append(lifecycle)
        return app


@dataclass
class Readiness:
    """Ready while the cache directory takes writes; upstream states are reported, not required
    (with an upstream down, the cache still serves what it holds)."""

    store: BlobStore
    clients: dict[str, UpstreamClient]

    async def __call__(self) -> tuple[bool, dict[str, object]]:
        writable = await asyncio.to_thread(_writable, self.store.tmp)
        upstreams = {name: client.health.state for name, client in self.clients.items()}
        return writable, {"cache_writable": writable, "upstreams": upstreams}


def _writable(directory: Path) -> bool:
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix="readyz-"):
            return True
    except OSError:
        return False


async def serve(config: Config, log_format: str = "text") -> None:
    """Run until SIGINT/SIGTERM; then stop accepting, finish what is in flight, release the cache."""
    instance = Edgecache.build(config, log_format)
    runners = [web.AppRunner(instance.web_app(), **RUNNER_OPTIONS)]
    listens = [config.server.listen]
    if config.server.metrics_listen:
        runners.append(web.AppRunner(instance.front.build_admin_app(log_format), **RUNNER_OPTIONS))
        listens.append(config.server.metrics_listen)
    try:
        for runner, listen in zip(runners, listens, strict=True):
            await runner.setup()
            host, _, port = listen.rpartition(":")
            await web.TCPSite(runner, host.strip("[]"), int(port), reuse_address=True).start()
        log.info(
            "edgecache listening on http://%s%s (cache %s, default upstream %s, pid %d)",
            config.server.listen,
            f", metrics on http://{config.server.metrics_listen}" if config.server.metrics_listen else "",
            config.cache.dir,
            config.default_upstream,
            os.getpid(),
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("edgecache stopping")
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
