"""Composition root: builds every part from the config, runs the listeners, shuts down cleanly."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import ssl
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from edgecache import sdnotify
from edgecache.access.policy import AccessPolicy
from edgecache.access.trust import TrustPolicy
from edgecache.config import AccessConfig, Config, UpstreamConfig, split_host_port
from edgecache.errors import ConfigError
from edgecache.fill.coalesce import Coalescer
from edgecache.fill.flights import Flights
from edgecache.fill.prefetch import Prefetcher
from edgecache.http.accesslog import AccessLog
from edgecache.http.aiohttp_front import AiohttpFront, Handler
from edgecache.http.aiohttp_server import ConnectionLimits, OciServerRunner, OciSite
from edgecache.http.connguard import ConnectionGuard
from edgecache.http.front import RegistryFront, Upstreams, trusted_networks
from edgecache.http.granian_front import AsgiFront, TlsListener
from edgecache.http.status import StatusBoard
from edgecache.http.tls import check_certificate, mutual_tls_context
from edgecache.metrics import Metrics
from edgecache.pull import PullService
from edgecache.shared.tier import SharedTier
from edgecache.sizes import parse_size
from edgecache.store.blobs import BlobStore, CacheDirLock
from edgecache.store.keeper import CacheKeeper
from edgecache.store.manifests import ManifestCache
from edgecache.store.membership import Membership
from edgecache.store.scrub import Scrubber
from edgecache.trust import SignatureGate
from edgecache.upstream.client import UpstreamClient
from edgecache.upstream.documents import DocumentFetcher
from edgecache.usage import Usage

log = logging.getLogger("edgecache")
SHUTDOWN_GRACE = 10.0  # seconds responses in flight get when a listener stops


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
    http: AiohttpFront
    members: Membership
    scrubber: Scrubber
    prefetcher: Prefetcher | None
    trust: SignatureGate
    access_log: AccessLog
    documents: DocumentFetcher = field(default_factory=DocumentFetcher)  # OIDC discovery and keys
    shared: SharedTier | None = None
    _started: bool = field(default=False, repr=False)
    _watch: asyncio.Task[None] | None = field(default=None, repr=False)

    @classmethod
    def build(
        cls,
        config: Config,
        log_format: str = "text",
        log_handler: logging.StreamHandler[TextIO] | None = None,
    ) -> Edgecache:
        """Everything the configuration asks for, not started. `log_handler`: where `serve` writes
        its logs; access lines are then written to it directly (see AccessLog)."""
        documents = DocumentFetcher()
        metrics = Metrics(u.name for u in config.upstreams)
        # reads the htpasswd file and token key: fail before taking the cache
        access = AccessPolicy(config.access, fetch=documents, metrics=metrics)
        trust_policy = TrustPolicy(config.trust)  # reads the trusted keys: the same
        root = Path(config.cache.dir).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        lock = CacheDirLock(root)
        lock.acquire()
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
        members = Membership(keeper.worker)
        prefetch = config.prefetch
        prefetcher = (
            Prefetcher(
                flights,
                keeper,
                metrics,
                concurrency=prefetch.concurrency,
                queue_limit=prefetch.queue_limit,
                max_bytes=parse_size(prefetch.max_bytes, "prefetch.max_bytes"),
                usable=lambda name: name not in clients or clients[name].health.state == "up",
            )
            if prefetch.enabled
            else None
        )
        if prefetcher is not None:
            keeper.on_evicted = prefetcher.evicted
        manifests = ManifestCache(store, on_corrupt=keeper.manifest_corrupt, vouch=keeper.may_serve)
        # `edgecache import` beside the server writes tag files: tags are read again from disk.
        keeper.on_outside_changes = manifests.forget_tags
        pull = PullService(
            store,
            manifests,
            flights,
            Coalescer(),
            metrics,
            keeper,
            members,
            tag_ttl=config.cache.tag_ttl,
            max_stale=config.cache.max_stale,
            stale_while_revalidate=config.cache.stale_while_revalidate,
            negative_ttl=config.cache.negative_ttl,
            prefetcher=prefetcher,
            watch_window=prefetch.watch_window,
            referrers_ttl=config.cache.referrers_ttl,
        )
        pull.set_unchecked(unchecked_upstreams(config.access, config.upstreams))
        shared = (
            SharedTier.build(config.shared, metrics, store.tmp, store.blob_path)
            if config.shared.enabled
            else None
        )
        if shared is not None:
            pull.set_shared(shared)
            flights.on_kept = shared.blob_kept
        trust = SignatureGate(trust_policy, pull, metrics)
        pull.set_trust(trust)
        readiness = Readiness(store, clients, shared)
        upstreams = Upstreams(clients, config.default_upstream)
        usage = Usage()
        status = StatusBoard(config.status, metrics, keeper, flights, clients, usage, root)
        front = RegistryFront(pull, upstreams, metrics, usage, readiness, access, status)
        http = AiohttpFront(front, metrics, config.server.trusted_proxies)
        scrubber = Scrubber(store, keeper, metrics, rate=config.cache.scrub_rate)
        return cls(
            config,
            lock,
            store,
            metrics,
            keeper,
            flights,
            clients,
            front,
            http,
            members,
            scrubber,
            prefetcher,
            trust,
            AccessLog(metrics, log_format, log_handler),
            documents,
            shared,
        )

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        if self.shared is not None:
            await self.shared.start()  # a missing bucket, or one refusing us, stops the start here
        await self.keeper.start()
        self.scrubber.start()
        unchecked = unchecked_upstreams(self.config.access, self.config.upstreams)
        if unchecked:
            log.info(
                "repository checks off for %s: anonymous access without rules, and no upstream "
                "credentials, so they would protect nothing; stored digests are served under any name",
                ", ".join(sorted(unchecked)),
            )
        for client in self.clients.values():
            await client.start()
        if self.prefetcher is not None and self.config.prefetch.watch_window > 0:
            self._watch = asyncio.create_task(self.front.pull.watch_pulled_tags(), name="watch pulled tags")
        if self.front.status is not None:
            self.front.status.start()  # samples the counters for the status page's windows

    async def close(self) -> None:
        if self.front.status is not None:
            await self.front.status.close()
        await self.scrubber.close()
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        if self.prefetcher is not None:
            await self.prefetcher.close()
        await self.front.pull.close()
        self.front.access.close()  # the LDAP threads: no new checks
        await self.documents.close()
        await self.flights.close()
        if self.shared is not None:
            await self.shared.close()
        for client in self.clients.values():
            await client.close()
        await self.members.flush()
        await self.keeper.close()
        self.access_log.flush()
        self.lock.release()

    def apply(self, new: Config) -> None:
        """Take what can change at run time from a reloaded configuration: upstream credentials,
        timeouts, tag TTL rules and health thresholds; cache TTLs, size limits, watermarks and the scrub
        rate; access rules, the htpasswd file, LDAP settings and the token key (not the access mode:
        that decides what the listeners are); the signature policy's rules and keys (its remembered
        verdicts are forgotten)."""
        access = new.access
        if (access.mode, access.client_ca) != (self.config.access.mode, self.config.access.client_ca):
            access = dataclasses.replace(
                access, mode=self.config.access.mode, client_ca=self.config.access.client_ca
            )
        trust = TrustPolicy(new.trust)  # rules and keys read: a ConfigError here applies nothing
        self.front.access.reconfigure(access)  # may raise ConfigError: nothing applied yet either
        self.trust.policy = trust  # (its remembered verdicts start empty)
        for upstream in new.upstreams:
            client = self.clients.get(upstream.name)
            if client is not None and client.config.url == upstream.url:
                client.reconfigure(upstream)
        self.front.pull.reconfigure(new.cache)
        in_use = [client.config for client in self.clients.values()]
        self.front.pull.set_unchecked(unchecked_upstreams(access, in_use))
        self.keeper.reconfigure(
            max_size=parse_size(new.cache.max_size, "cache.max_size"),
            high_watermark=new.cache.high_watermark,
            low_watermark=new.cache.low_watermark,
            min_free=parse_size(new.cache.min_free, "cache.min_free"),
        )
        self.scrubber.reconfigure(new.cache.scrub_rate)
        if self.prefetcher is not None:  # (turning prefetch on or off, or the watch, needs a restart)
            self.prefetcher.reconfigure(
                concurrency=new.prefetch.concurrency,
                queue_limit=new.prefetch.queue_limit,
                max_bytes=parse_size(new.prefetch.max_bytes, "prefetch.max_bytes"),
            )
        if self.front.status is not None:
            self.front.status.reconfigure(new.status)
        kept = restart_needed(self.config, new)
        self.config = new if not kept else self.config

    def web_handler(self) -> Handler:
        """The registry API as one aiohttp low-level handler (tests and `warm` embed it so; they
        start and close the instance around it)."""
        return self.http.handler(self.access_log, admin=not self.config.server.metrics_listen)


@dataclass
class Readiness:
    """Ready while the cache directory takes writes; upstream states are reported, not required
    (with an upstream down, the cache still serves what it holds)."""

    store: BlobStore
    clients: dict[str, UpstreamClient]
    shared: SharedTier | None = None

    async def __call__(self) -> tuple[bool, dict[str, object]]:
        writable = await asyncio.to_thread(_writable, self.store.tmp)
        upstreams = {name: client.health.state for name, client in self.clients.items()}
        answer: dict[str, object] = {"cache_writable": writable, "upstreams": upstreams}
        if self.shared is not None:  # reported, not required: misses go to the upstream meanwhile
            answer["shared_tier"] = self.shared.state
        return writable, answer


def _writable(directory: Path) -> bool:
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix="readyz-"):
            return True
    except OSError:
        return False


def unchecked_upstreams(access: AccessConfig, upstreams: Iterable[UpstreamConfig]) -> frozenset[str]:
    """The upstreams for which checking which repository holds a digest protects nothing.

    That check keeps a client allowed on one repository from reading another's content by digest,
    and keeps what edgecache fetched with its upstream credentials from repositories the upstream
    would refuse. With anonymous access and no rules everyone may pull every repository, and from an
    upstream reached without credentials everything stored was public: serving a stored digest under
    any repository name then shows nobody anything they could not pull anyway. For those upstreams
    it is skipped, so a cache whose repository facts were lost still serves while upstream is down.
    Everywhere else the check stays, and a digest with no known repository is confirmed upstream.
    """
    if access.mode != "anonymous" or access.rules:
        return frozenset()
    return frozenset(u.name for u in upstreams if not u.username)


def restart_needed(old: Config, new: Config) -> list[str]:
    """What a reload cannot change: listeners, the cache directory, the set of upstreams and their URLs,
    the access mode."""
    changed = []
    if old.server != new.server:
        changed.append("server (listeners)")
    if old.cache.dir != new.cache.dir:
        changed.append("cache.dir")
    if old.default_upstream != new.default_upstream:
        changed.append("default_upstream")
    old_urls = {u.name: (u.url, u.ca_bundle, u.max_connections) for u in old.upstreams}
    new_urls = {u.name: (u.url, u.ca_bundle, u.max_connections) for u in new.upstreams}
    if old_urls != new_urls:
        changed.append("upstream names, urls, ca_bundle or max_connections")
    if (old.access.mode, old.access.client_ca) != (new.access.mode, new.access.client_ca):
        changed.append("access.mode or access.client_ca")
    if (old.prefetch.enabled, old.prefetch.watch_window) != (new.prefetch.enabled, new.prefetch.watch_window):
        changed.append("prefetch.enabled or prefetch.watch_window")
    if old.shared != new.shared:
        changed.append("shared (the shared tier)")
    return changed


class Listeners:
    """Every listener of one instance: aiohttp for plain HTTP (and mutual-TLS HTTP/1.1), embedded
    granian for TLS with HTTP/2; all of them adapters over the same RegistryFront."""

    def __init__(self, instance: Edgecache) -> None:
        self._instance = instance
        self._runners: list[tuple[OciServerRunner, str, ssl.SSLContext | None]] = []
        self._tls: list[TlsListener] = []
        self._guards: list[ConnectionGuard] = []
        self._mtls_context: ssl.SSLContext | None = None
        self.urls: list[str] = []

    async def start(self) -> None:
        instance, config = self._instance, self._instance.config
        server, access_log = config.server, instance.access_log
        admin = not server.metrics_listen
        for listen, tls in server.listeners():
            if not tls:
                self._add_runner(instance.http.handler(access_log, admin=admin), listen, None)
            elif config.access.uses("mtls"):
                context = mutual_tls_context(server.tls_cert, server.tls_key, config.access.client_ca)
                self._mtls_context = context
                self._add_runner(instance.http.handler(access_log, admin=admin), listen, context)
            else:
                host, port = split_host_port(listen, "server.listen")
                trusted = trusted_networks(server.trusted_proxies)
                app = AsgiFront(instance.front, instance.metrics, trusted, access_log, admin)
                self._tls.append(TlsListener(app, host, port, server))
                guard = ConnectionGuard(
                    port,
                    idle_timeout=server.idle_timeout,
                    max_connections=server.max_connections,
                    metrics=instance.metrics,
                )
                self._guards.append(guard)
                self.urls.append(f"https://{listen} (HTTP/2, HTTP/1.1)")
        if server.metrics_listen:
            self._add_runner(instance.http.admin_handler(access_log), server.metrics_listen, None)
        for runner, listen, site_context in self._runners:
            await runner.setup()
            host, port = split_host_port(listen, "server.listen")
            timeout = self._instance.config.server.tls_handshake_timeout
            await OciSite(runner, host, port, ssl_context=site_context, handshake_timeout=timeout).start()
        for listener in self._tls:
            await listener.start()
        for guard in self._guards:
            guard.start()

    def _add_runner(self, handler: Handler, listen: str, context: ssl.SSLContext | None) -> None:
        server = self._instance.config.server
        limits = ConnectionLimits(server.max_connections, server.header_timeout)
        runner = OciServerRunner(handler, limits=limits, shutdown_timeout=SHUTDOWN_GRACE)
        self._runners.append((runner, listen, context))
        self.urls.append(f"{'https' if context else 'http'}://{listen}")

    async def reload_certificates(self) -> None:
        """SIGHUP: re-read the certificate and key; a bad pair is refused and the old one kept."""
        server = self._instance.config.server
        if not server.tls:
            return
        try:  # file reads and parsing: off the event loop
            cert = await asyncio.to_thread(check_certificate, server.tls_cert, server.tls_key)
        except ConfigError as exc:
            log.error("TLS certificate not reloaded, the old one stays in use: %s", exc)
            return
        if self._mtls_context is not None:
            self._mtls_context.load_cert_chain(server.tls_cert, server.tls_key)
        for listener in self._tls:
            listener.reload()
        log.info(
            "TLS certificate reloaded: %s, valid until %s",
            cert.subject.rfc4514_string(),
            cert.not_valid_after_utc,
        )

    async def stop(self) -> None:
        for guard in self._guards:
            await guard.stop()
        for listener in self._tls:
            await listener.stop()
        for runner, _listen, _context in reversed(self._runners):
            await runner.cleanup()


async def serve(
    config: Config,
    log_format: str = "text",
    reload: Callable[[], Config] | None = None,
    log_handler: logging.StreamHandler[TextIO] | None = None,
) -> None:
    """Run until SIGINT/SIGTERM: then stop accepting, let responses in flight finish (10 s at most),
    and release the cache. SIGHUP re-reads the configuration (`reload`) and the TLS certificate."""
    if config.server.tls:
        check_certificate(config.server.tls_cert, config.server.tls_key)
    instance = Edgecache.build(config, log_format, log_handler)
    listeners = Listeners(instance)
    try:
        await instance.start()
        await listeners.start()
        log.info(
            "edgecache listening on %s (cache %s, default upstream %s, pid %d)",
            ", ".join(listeners.urls),
            config.cache.dir,
            config.default_upstream,
            os.getpid(),
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if reload is not None:
            loop.add_signal_handler(
                signal.SIGHUP, lambda: asyncio.ensure_future(_reload(instance, listeners, reload))
            )
        sdnotify.notify("READY=1", f"STATUS=serving on {config.server.listen}")
        await stop.wait()
        sdnotify.notify("STOPPING=1")
        log.info("edgecache stopping: no new connections; finishing responses in flight")
    finally:
        await listeners.stop()
        await instance.close()
        log.info("edgecache stopped")


async def _reload(instance: Edgecache, listeners: Listeners, load: Callable[[], Config]) -> None:
    sdnotify.reloading()
    try:
        new = load()
    except ConfigError as exc:
        log.error("reload refused, configuration unchanged: %s", exc)
        sdnotify.notify("READY=1", "STATUS=reload refused: see the log")
        return
    for what in restart_needed(instance.config, new):
        log.warning("reload: %s changed; that takes a restart (kept as it was)", what)
    try:
        instance.apply(new)
    except ConfigError as exc:
        log.error("reload refused, configuration unchanged: %s", exc)
        sdnotify.notify("READY=1", "STATUS=reload refused: see the log")
        return
    await listeners.reload_certificates()
    log.info("configuration reloaded")
    sdnotify.notify("READY=1", f"STATUS=serving on {instance.config.server.listen} (reloaded)")
