"""Composition root: builds every part from the config, runs the listeners, shuts down cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from edgecache.blobstore import BlobStore, CacheDirLock
from edgecache.config import Config
from edgecache.flights import Flights
from edgecache.manifests import ManifestCache
from edgecache.metrics import Metrics
from edgecache.pull import PullService
from edgecache.upstream import UpstreamClient
from edgecache.web import RegistryFront, Upstreams

log = logging.getLogger("edgecache")


@dataclass
class Edgecache:
    """Everything one running instance owns; `start()` and `close()` bracket its life."""

    config: Config
    lock: CacheDirLock
    store: BlobStore
    metrics: Metrics
    flights: Flights
    clients: dict[str, UpstreamClient]
    front: RegistryFront

    @classmethod
    def build(cls, config: Config) -> Edgecache:
        root = Path(config.cache.dir).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        lock = CacheDirLock(root)
        lock.acquire()
        store = BlobStore(root)
        store.prepare()
        metrics = Metrics(u.name for u in config.upstreams)
        clients = {u.name: UpstreamClient(u, metrics) for u in config.upstreams}
        flights = Flights(
            store,
            metrics,
            negative_ttl=config.cache.negative_ttl,
            cancel_abandoned=config.cache.abandoned_fills == "cancel",
        )

        pull = PullService(
            store,
            ManifestCache(store),
            flights,
            metrics,
            tag_ttl=config.cache.tag_ttl,
            max_stale=config.cache.max_stale,
            stale_while_revalidate=config.cache.stale_while_revalidate,
            negative_ttl=config.cache.negative_ttl,
        )
        front = RegistryFront(pull, Upstreams(clients, config.default_upstream), metrics)
        return cls(config, lock, store, metrics, flights, clients, front)

    async def start(self) -> None:
        for client in self.clients.values():
            await client.start()

    async def close(self) -> None:
        await self.flights.close()
        for client in self.clients.values():
            await client.close()
        self.lock.release()

    def web_app(self) -> web.Application:
        app = self.front.build_app()

        async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
            await self.start()
            yield
            await self.close()

        app.cleanup_ctx.append(lifecycle)
        return app


async def serve(config: Config, ready: asyncio.Event | None = None) -> None:
    """Run until SIGINT/SIGTERM; then stop accepting, finish what is in flight, release the cache."""
    instance = Edgecache.build(config)
    runner = web.AppRunner(instance.web_app(), access_log=None, shutdown_timeout=10.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.server.host, config.server.port, reuse_address=True)
        await site.start()
        log.info(
            "edgecache listening on http://%s (cache %s, default upstream %s)",
            config.server.listen,
            config.cache.dir,
            config.default_upstream,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("edgecache stopping")
    finally:
        await runner.cleanup()
