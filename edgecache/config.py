"""Configuration: frozen dataclasses built from defaults, a TOML file, environment variables and flags.

Precedence, lowest first: defaults < `--config` file < `EDGECACHE_*` environment < command-line flags.
Every problem raises ConfigError naming the key, so the operator sees one line, not a traceback.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import logging
import math
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from edgecache.errors import ConfigError
from edgecache.oci import REGISTRY_HOST
from edgecache.sizes import parse_size

log = logging.getLogger(__name__)
DOCKER_HUB_URL = "https://registry-1.docker.io"
StrList = tuple[str, ...]
TtlRules = tuple[tuple[str, float], ...]
ENV_PREFIX = "EDGECACHE_"


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "edgecache")


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:5000"
    metrics_listen: str = ""
    # With a certificate and key, `listen` serves TLS (HTTP/2 and HTTP/1.1 by ALPN); `plain_listen`
    # then adds a plain-HTTP listener (loopback, or behind a TLS-terminating load balancer).
    tls_cert: str = ""
    tls_key: str = ""
    tls_handshake_timeout: float = 10.0
    plain_listen: str = ""
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections: int = 1024
    trusted_proxies: StrList = ()

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def listeners(self) -> list[tuple[str, bool]]:
        """(HOST:PORT, is TLS) of every registry listener."""
        found = [(self.listen, self.tls)]
        if self.plain_listen:
            found.append((self.plain_listen, False))
        return found

    @property
    def host(self) -> str:
        return split_host_port(self.listen, "server.listen")[0]

    @property
    def port(self) -> int:
        return split_host_port(self.listen, "server.listen")[1]


@dataclass(frozen=True)
class CacheConfig:
    dir: str = field(default_factory=default_cache_dir)
    max_size: str = "0"
    high_watermark: float = 0.95
    low_watermark: float = 0.90
    min_free: str = "0"
    tag_ttl: float = 60.0
    stale_while_revalidate: float = 0.0
    max_stale: float = 86400.0
    negative_ttl: float = 30.0
    referrers_ttl: float = 30.0  # a referrers listing is kept this long; 0: asked upstream every time
    abandoned_fills: str = "finish"
    scrub_rate: float = 20.0  # MB/s the background scrubber re-hashes stored files at; 0: off


@dataclass(frozen=True)
class UpstreamConfig:
    name: str = "docker.io"
    url: str = DOCKER_HUB_URL
    library_prefix: bool | None = None
    username: str = ""
    password_env: str = ""
    password_file: str = ""
    connect_timeout: float = 5.0
    header_timeout: float = 10.0
    stall_timeout: float = 15.0
    min_rate: str = "16K"
    rate_window: float = 20.0
    max_connections: int = 32
    ca_bundle: str = ""
    aliases: StrList = ()
    token_hosts: StrList = ()
    tag_ttls: TtlRules = ()
    down_after: int = 3
    down_for: float = 30.0
    parent: bool = False

    @property
    def adds_library_prefix(self) -> bool:
        """Docker Hub's official images live under `library/`; other registries have no such rule."""
        if self.library_prefix is not None:
            return self.library_prefix
        return self.name == "docker.io" or urlsplit(self.url).hostname == "registry-1.docker.io"

    def tag_ttl(self, tag: str, default: float) -> float:
        """The first rule whose glob pattern matches the tag, else the cache-wide TTL."""
        for pattern, ttl in self.tag_ttls:
            if fnmatch.fnmatchcase(tag, pattern):
                return ttl
        return default

    def password(self) -> str:
        """Read at use, never stored in the config object, so it cannot end up in a log of it."""
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(f"upstream {self.name}: password_env {self.password_env} is not set")
            return value
        if self.password_file:
            try:
                return Path(self.password_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"upstream {self.name}: password_file cannot be read ({exc.strerror})"
                ) from None
        return ""


@dataclass(frozen=True)
class AccessRule:
    """Which repositories one identity may pull: globs on UPSTREAM/REPOSITORY (`*` spans slashes).
    `identity` is a user name, a certificate subject, `*` (anyone authenticated) or `anonymous`."""

    identity: str
    allow: StrList = ()
    deny: StrList = ()


@dataclass(frozen=True)
class LdapConfig:
    """[access.ldap]: where the directory is and how a login is checked against it. The service
    account finds the user's DN (`user_filter` under `base_dn`, `{user}` escaped); the user's own bind
    checks the password. Groups come from `group_attribute` on the user's entry (group DNs: their first
    RDN value is the group's name) and/or a search under `group_base_dn` with `group_filter` (`{dn}`)."""

    url: str = ""  # ldaps://host:636 or ldap://host:389 (plain only with start_tls or allow_plain)
    start_tls: bool = False
    ca_file: str = ""  # CA bundle that signs the directory's certificate (else the system's)
    allow_plain: bool = False  # ldap:// without StartTLS: passwords cross the network in clear
    bind_dn: str = ""
    bind_password_file: str = ""
    base_dn: str = ""
    user_filter: str = "(uid={user})"
    group_attribute: str = "memberOf"  # "" for none
    group_base_dn: str = ""  # "" for no group search
    group_filter: str = "(member={dn})"
    group_name_attribute: str = "cn"
    connect_timeout: float = 3.0
    response_timeout: float = 5.0
    max_concurrent: int = 8  # directory checks in flight at once (worker threads)


@dataclass(frozen=True)
class OidcConfig:
    """[access.oidc]: bearer tokens from an outside OpenID Connect issuer. Its keys come from `jwks_url`
    (or the issuer's discovery document), fetched with their own deadline, cached, and fetched again
    when a token names an unknown key id (at most once per `refresh_interval`)."""

    issuer: str = ""  # "" = off; e.g. https://login.corp.example/realms/dc
    audience: str = ""  # the `aud` a token must carry (this mirror's client id at the issuer)
    jwks_url: str = ""  # "" = from {issuer}/.well-known/openid-configuration
    identity_claim: str = "sub"  # e.g. preferred_username, email
    groups_claim: str = "groups"
    algorithms: StrList = ("RS256", "ES256")  # asymmetric only: none and HS* are refused
    fetch_timeout: float = 5.0
    refresh_interval: float = 60.0  # fewest seconds between two fetches on unknown key ids
    keys_ttl: float = 3600.0  # keys are fetched again after this long (kept if the issuer is down)
    ca_file: str = ""  # CA bundle for the issuer's TLS certificate (else the system's)
    allow_plain: bool = False  # http:// issuer or JWKS URL: keys could be swapped on the network


OIDC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


@dataclass(frozen=True)
class AccessConfig:
    # anonymous | htpasswd | ldap | mtls, or a comma-separated list / TOML array of htpasswd, ldap and
    # mtls tried in order (e.g. "htpasswd,ldap").
    mode: str = "anonymous"
    htpasswd: str = ""
    client_ca: str = ""
    login_cache: float = 60.0
    max_failures: int = 10
    rules: tuple[AccessRule, ...] = ()
    ldap: LdapConfig = field(default_factory=LdapConfig)
    oidc: OidcConfig = field(default_factory=OidcConfig)
    # The token service: 401s ask for a Bearer token from <realm>; /token issues one per login.
    token: bool = False
    token_key: str = ""  # PEM private key (EC P-256 → ES256, RSA → RS256) that signs tokens
    token_ttl: float = 300.0
    token_service: str = "edgecache"  # the `service` of the challenge and the tokens' audience
    token_realm: str = ""  # the /token URL clients are sent to; "" = this node as the client named it

    @property
    def modes(self) -> tuple[str, ...]:
        """The login modes in the order they are tried."""
        return tuple(m.strip() for m in self.mode.split(",") if m.strip())

    def uses(self, mode: str) -> bool:
        return mode in self.modes

    @property
    def logins(self) -> bool:
        """A login mode is on: anonymous clients are asked to authenticate."""
        return any(m != "anonymous" for m in self.modes)


ACCESS_MODES = ("anonymous", "htpasswd", "ldap", "mtls")


@dataclass(frozen=True)
class TrustRule:
    """What the signature policy asks of the manifests of repositories matching `pattern` (a glob on
    UPSTREAM/REPOSITORY, `*` spans slashes, as in access rules): "accept" them, "reject" them, or
    "require" a sigstore/cosign signature by one of `keys` (PEM public key files)."""

    pattern: str
    action: str
    keys: StrList = ()


TRUST_ACTIONS = ("accept", "reject", "require")


@dataclass(frozen=True)
class TrustConfig:
    """[trust]: ordered [[trust.rules]] (the first match wins; nothing matching is accepted)."""

    rules: tuple[TrustRule, ...] = ()
    cache_size: int = 10_000  # verified (digest, rule, repository) verdicts remembered; cleared on SIGHUP
    max_signature_bytes: str = "64K"  # a signature payload blob larger than this is not fetched


@dataclass(frozen=True)
class PrefetchConfig:
    """Fills started ahead of the client from a manifest it was served (pull.prefetch)."""

    enabled: bool = True
    concurrency: int = 6  # prefetch fills at once per upstream (a client's own fills are not counted)
    max_bytes: str = "2G"  # of one manifest's blobs; the layers past it are left to the client
    queue_limit: int = 1000  # blobs waiting per upstream; more are not prefetched
    watch_window: float = 3600.0  # a tag pulled this recently is revalidated in the background; 0: off


@dataclass(frozen=True)
class StatusConfig:
    """The status page (/_edgecache/status and status.json), served where /metrics is."""

    enabled: bool = True


@dataclass(frozen=True)
class SharedConfig:
    """The shared object-storage tier (S3 API, e.g. Ceph RGW) between the local disk and the upstream
    (edgecache.shared). Off while `endpoint` is empty. Credentials never live here: they come from
    `credentials_file` or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, read when the tier is built."""

    endpoint: str = ""  # e.g. https://rgw.dc1:7480 (path-style addressing)
    bucket: str = ""
    prefix: str = ""  # keys are <prefix>blobs/sha256/<hex> and <prefix>manifests/sha256/<hex>
    region: str = "us-east-1"
    ca_bundle: str = ""  # PEM file of CAs for an https endpoint (default: the system's)
    credentials_file: str = ""  # AWS shared-credentials format ([default] aws_access_key_id = ...)
    connect_timeout: float = 2.0  # the bucket is in the datacenter: short deadlines, then the upstream
    header_timeout: float = 5.0
    stall_timeout: float = 5.0
    min_rate: str = "1M"  # per second over rate_window, or the read is a stall (0: no check)
    rate_window: float = 10.0
    down_after: int = 3  # failures in a row (a missed deadline: at once) before the tier is skipped
    down_for: float = 60.0  # the longest wait between two probes while it is down
    upload_concurrency: int = 2  # uploads at once (each multipart upload sends up to 4 parts at once)
    upload_queue: int = 1000  # uploads waiting; more are skipped and counted
    multipart_threshold: str = "16M"  # larger objects go up in 8 MiB parts
    head_before_upload: bool = True  # ask whether another node uploaded it first (skips the PUT)

    @property
    def enabled(self) -> bool:
        return bool(self.endpoint)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    upstreams: tuple[UpstreamConfig, ...] = (UpstreamConfig(),)
    default_upstream: str = "docker.io"
    access: AccessConfig = field(default_factory=AccessConfig)
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    status: StatusConfig = field(default_factory=StatusConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    shared: SharedConfig = field(default_factory=SharedConfig)

    def upstream(self, name: str) -> UpstreamConfig | None:
        return next((u for u in self.upstreams if u.name == name), None)


def split_host_port(text: str, key: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{key}: expected HOST:PORT (e.g. 127.0.0.1:5000), got {text!r}")
    return host, int(port_text)


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_KINDS = {str: "a string", float: "a number", int: "an integer", bool: "true or false"}


def _coerce(key: str, value: Any, target: Any) -> Any:
    """Check one value against its field type; strings from the environment are converted.

    Lists come from TOML arrays or comma-separated text; TTL rules from a TOML table
    (`{ "latest" = 30, "v*" = 86400 }`) or `pattern=seconds,pattern=seconds` text.
    """
    if target == bool | None:
        target = bool
    if target == StrList:
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return tuple(items)
    if target == TtlRules:
        if isinstance(value, str):
            pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ConfigError(f"{key}: expected pattern=seconds,..., got {value!r}")
            value = {p[0].strip(): p[1] for p in pairs}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table of tag pattern = seconds, got {value!r}")
        rules = tuple((str(k), _coerce(f"{key}.{k}", v, float)) for k, v in value.items())
        if any(ttl < 0 for _, ttl in rules):
            raise ConfigError(f"{key}: TTLs must be >= 0 seconds")
        return rules
    if target is str and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # sizes may be written as plain byte counts
    if isinstance(value, str) and target is not str:
        text = value.strip().lower()
        try:
            value = _BOOLS[text] if target is bool else target(text)
        except (KeyError, ValueError):
            raise ConfigError(f"{key}: expected {_KINDS[target]}, got {value!r}") from None
    if target is bool:
        ok = isinstance(value, bool)
    elif target is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif target is float:
        # nan and inf would pass every `< 0` check and make a TTL or timeout meaningless
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, target)
    if not ok:
        raise ConfigError(f"{key}: expected {_KINDS[target]}, got {value!r}")
    return float(value) if target is float else value


def _build(cls: type[Any], section: str, values: Mapping[str, Any]) -> Any:
    types = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in types:
            known = ", ".join(sorted(types))
            raise ConfigError(f"{section}.{key}: unknown key (known keys: {known})")
        kwargs[key] = _coerce(f"{section}.{key}", value, types[key])
    for required in dataclasses.fields(cls):
        no_default = required.default is dataclasses.MISSING
        if no_default and required.default_factory is dataclasses.MISSING and required.name not in kwargs:
            raise ConfigError(f"{section}.{required.name}: required")
    return cls(**kwargs)


# Keys renamed since an earlier release: still read, with a warning naming the new one.
_RENAMED = {"read_timeout": "stall_timeout"}


def _renamed_keys(table: Mapping[str, Any], section: str) -> dict[str, Any]:
    renamed = dict(table)
    for old, new in _RENAMED.items():
        if old in renamed:
            value = renamed.pop(old)
            if new in renamed:
                raise ConfigError(f"{section}.{old}: renamed to {new}; set only {new}")
            log.warning("%s.%s is now called %s; please rename it", section, old, new)
            renamed[new] = value
    return renamed


def _field_types(cls: type[Any]) -> dict[str, Any]:
    """Annotations are strings under `from __future__ import annotations`; resolve them."""
    return typing.get_type_hints(cls)


def load_config(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    *,
    listen: str | None = None,
    cache_dir: str | None = None,
    upstreams: list[str] | None = None,
    max_size: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> Config:
    """Build the effective configuration; raises ConfigError naming the offending key."""
    doc: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"--config {path}: cannot read ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"--config {path}: not valid TOML ({exc})") from None
    env = os.environ if env is None else env
    known_top = {
        "server",
        "cache",
        "upstream",
        "default_upstream",
        "access",
        "prefetch",
        "status",
        "trust",
        "shared",
    }
    for key in doc:
        if key not in known_top:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(known_top))})")

    server = dict(_table(doc, "server"))
    cache = dict(_table(doc, "cache"))
    access = dict(_table(doc, "access"))
    prefetch = dict(_table(doc, "prefetch"))
    status = dict(_table(doc, "status"))
    trust = dict(_table(doc, "trust"))
    shared = dict(_table(doc, "shared"))
    upstream_tables = doc.get("upstream", [])
    if isinstance(upstream_tables, dict):
        upstream_tables = [upstream_tables]
    if not isinstance(upstream_tables, list) or not all(isinstance(t, dict) for t in upstream_tables):
        raise ConfigError("upstream: expected [[upstream]] tables")
    default_name = doc.get("default_upstream")
    if default_name is not None and not isinstance(default_name, str):
        raise ConfigError(f"default_upstream: expected a string, got {default_name!r}")

    # Environment: EDGECACHE_SERVER_LISTEN, EDGECACHE_CACHE_DIR, EDGECACHE_UPSTREAM_URL (the default
    # upstream), EDGECACHE_DEFAULT_UPSTREAM.
    default_overrides: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        if rest == "default_upstream":
            default_name = value
        elif rest.startswith("server_"):
            server[rest[len("server_") :]] = value
        elif rest.startswith("cache_"):
            cache[rest[len("cache_") :]] = value
        elif rest.startswith("access_") and rest != "access_rules":
            access[rest[len("access_") :]] = value
        elif rest.startswith("prefetch_"):
            prefetch[rest[len("prefetch_") :]] = value
        elif rest.startswith("status_"):
            status[rest[len("status_") :]] = value
        elif rest.startswith("shared_"):
            shared[rest[len("shared_") :]] = value
        elif rest.startswith("upstream_"):
            default_overrides[rest[len("upstream_") :]] = value
    if listen is not None:
        server["listen"] = listen
    if cache_dir is not None:
        cache["dir"] = cache_dir
    if max_size is not None:
        cache["max_size"] = max_size
    if tls_cert is not None:
        server["tls_cert"] = tls_cert
    if tls_key is not None:
        server["tls_key"] = tls_key

    built_upstreams = [
        _build(UpstreamConfig, f"upstream[{i}]", _renamed_keys(table, f"upstream[{i}]"))
        for i, table in enumerate(upstream_tables)
    ] or [UpstreamConfig()]
    if default_name is None:
        default_name = built_upstreams[0].name
    for spec in upstreams or []:
        name, sep, url = spec.partition("=")
        if not sep:  # a bare URL sets the default upstream's URL
            default_overrides["url"] = spec
            continue
        if not name:
            raise ConfigError(f"--upstream {spec!r}: expected URL or NAME=URL")
        entry = UpstreamConfig(name=name, url=url, library_prefix=None)
        built_upstreams = [u for u in built_upstreams if u.name != name] + [entry]
    if default_overrides:
        index = next((i for i, u in enumerate(built_upstreams) if u.name == default_name), None)
        if index is None:
            raise ConfigError(f"default_upstream: no upstream is named {default_name!r}")
        types = _field_types(UpstreamConfig)
        changes: dict[str, Any] = {}
        for key, value in _renamed_keys(default_overrides, "EDGECACHE_UPSTREAM").items():
            if key not in types:
                raise ConfigError(f"EDGECACHE_UPSTREAM_{key.upper()}: unknown key")
            changes[key] = _coerce(f"upstream.{key}", value, types[key])
        built_upstreams[index] = dataclasses.replace(built_upstreams[index], **changes)

    config = Config(
        server=_build(ServerConfig, "server", server),
        cache=_build(CacheConfig, "cache", cache),
        upstreams=tuple(built_upstreams),
        default_upstream=default_name,
        access=_build_access(access),
        prefetch=_build(PrefetchConfig, "prefetch", prefetch),
        status=_build(StatusConfig, "status", status),
        trust=_build_trust(trust),
        shared=_build(SharedConfig, "shared", shared),
    )
    validate(config)
    return config


T = TypeVar("T")


def _build_table(cls: type[T], key: str, table: object) -> T:
    """A sub-table (`[access.ldap]`) as its dataclass."""
    if not isinstance(table, dict):
        raise ConfigError(f"{key}: expected an [{key}] table")
    built: T = _build(cls, key, table)
    return built


def _build_list(cls: type[T], key: str, tables: object) -> tuple[T, ...]:
    """An array of tables (`[[access.rules]]`) as a tuple of its dataclass."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{key}: expected [[{key}]] tables")
    return tuple(_build(cls, f"{key}[{i}]", t) for i, t in enumerate(tables))


def _build_access(table: dict[str, Any]) -> AccessConfig:
    built = _build_list(AccessRule, "access.rules", table.pop("rules", []))
    for i, rule in enumerate(built):
        if not rule.identity:
            raise ConfigError(f"access.rules[{i}].identity: must be set")
    ldap = _build_table(LdapConfig, "access.ldap", table.pop("ldap", {}))
    oidc = _build_table(OidcConfig, "access.oidc", table.pop("oidc", {}))
    mode = table.get("mode")
    if isinstance(mode, list):  # mode = ["htpasswd", "ldap"]: tried in order
        if not all(isinstance(m, str) for m in mode):
            raise ConfigError(f"access.mode: expected a string or a list of strings, got {mode!r}")
        table["mode"] = ",".join(mode)
    access: AccessConfig = _build(AccessConfig, "access", table)
    return dataclasses.replace(access, rules=built, ldap=ldap, oidc=oidc)


def _build_trust(table: dict[str, Any]) -> TrustConfig:
    built = _build_list(TrustRule, "trust.rules", table.pop("rules", []))
    for i, rule in enumerate(built):
        key = f"trust.rules[{i}]"
        if not rule.pattern:
            raise ConfigError(f"{key}.pattern: must be set (a glob on UPSTREAM/REPOSITORY)")
        if rule.action not in TRUST_ACTIONS:
            raise ConfigError(f"{key}.action: one of {', '.join(TRUST_ACTIONS)}, got {rule.action!r}")
        if rule.action == "require" and not rule.keys:
            raise ConfigError(f"{key}.keys: a require rule needs at least one public key file")
        if rule.action != "require" and rule.keys:
            raise ConfigError(f"{key}.keys: only a require rule has keys")
    trust: TrustConfig = _build(TrustConfig, "trust", table)
    if trust.cache_size < 1:
        raise ConfigError("trust.cache_size: must be >= 1")
    parse_size(trust.max_signature_bytes, "trust.max_signature_bytes")
    return dataclasses.replace(trust, rules=built)


def _table(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    table = doc.get(key, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{key}: expected a table [{key}]")
    return table


def validate(config: Config) -> None:
    _validate_server(config.server)
    _validate_shared(config.shared)
    _validate_access(config)
    max_size = parse_size(config.cache.max_size, "cache.max_size")
    parse_size(config.cache.min_free, "cache.min_free")
    if not 0 < config.cache.low_watermark < config.cache.high_watermark <= 1:
        raise ConfigError("cache.low_watermark/high_watermark: need 0 < low < high <= 1")
    if max_size and max_size < 1024 * 1024:
        raise ConfigError("cache.max_size: at least 1M (0 means no limit)")
    if config.cache.tag_ttl < 0:
        raise ConfigError("cache.tag_ttl: must be >= 0 seconds")
    if config.cache.max_stale < 0:
        raise ConfigError("cache.max_stale: must be >= 0 seconds")
    if config.cache.stale_while_revalidate < 0:
        raise ConfigError("cache.stale_while_revalidate: must be >= 0 seconds")
    if config.cache.negative_ttl < 0:
        raise ConfigError("cache.negative_ttl: must be >= 0 seconds")
    if config.cache.referrers_ttl < 0:
        raise ConfigError("cache.referrers_ttl: must be >= 0 seconds")
    if config.cache.scrub_rate < 0:
        raise ConfigError("cache.scrub_rate: must be >= 0 MB/s (0 turns the scrubber off)")
    parse_size(config.prefetch.max_bytes, "prefetch.max_bytes")
    if config.prefetch.concurrency < 1:
        raise ConfigError("prefetch.concurrency: must be >= 1 (prefetch.enabled = false turns it off)")
    if config.prefetch.queue_limit < 1:
        raise ConfigError("prefetch.queue_limit: must be >= 1")
    if config.prefetch.watch_window < 0:
        raise ConfigError("prefetch.watch_window: must be >= 0 seconds (0 turns the watch off)")
    if config.cache.abandoned_fills not in ("finish", "cancel"):
        raise ConfigError(
            f'cache.abandoned_fills: must be "finish" or "cancel", got {config.cache.abandoned_fills!r}'
        )
    names: set[str] = set()
    for upstream in config.upstreams:
        key = f"upstream {upstream.name!r}"
        if not upstream.name or upstream.name in names:
            raise ConfigError(f"{key}: name must be set and unique")
        if not REGISTRY_HOST.fullmatch(upstream.name):
            raise ConfigError(
                f"{key}: name must be a registry host as clients write it (e.g. ghcr.io, registry.corp:5000)"
            )
        names.add(upstream.name)
        parts = urlsplit(upstream.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{key}: url must be http(s)://HOST[:PORT], got {upstream.url!r}")
        if parts.query or parts.fragment or parts.username:
            raise ConfigError(f"{key}: url must not carry a query, fragment or credentials")
        if parts.scheme == "http" and upstream.username and not _is_loopback(parts.hostname):
            raise ConfigError(f"{key}: refusing to send credentials over plain http")
        for timeout in ("connect_timeout", "header_timeout", "stall_timeout", "rate_window"):
            if getattr(upstream, timeout) <= 0:
                raise ConfigError(f"{key}: {timeout} must be > 0")
        parse_size(upstream.min_rate, f"{key}.min_rate")
        if upstream.max_connections < 1:
            raise ConfigError(f"{key}: max_connections must be >= 1")
        if upstream.password_env and upstream.password_file:
            raise ConfigError(f"{key}: set password_env or password_file, not both")
        if upstream.down_after < 1 or upstream.down_for < 0:
            raise ConfigError(f"{key}: down_after must be >= 1 and down_for >= 0")
        if upstream.ca_bundle and not os.path.isfile(upstream.ca_bundle):
            raise ConfigError(f"{key}: ca_bundle {upstream.ca_bundle} is not a readable file")
    if config.upstream(config.default_upstream) is None:
        raise ConfigError(f"default_upstream: no upstream is named {config.default_upstream!r}")


def _validate_server(server: ServerConfig) -> None:
    split_host_port(server.listen, "server.listen")
    for key in ("metrics_listen", "plain_listen"):
        if getattr(server, key):
            split_host_port(getattr(server, key), f"server.{key}")
    if bool(server.tls_cert) != bool(server.tls_key):
        raise ConfigError("server.tls_cert/tls_key: set both (certificate and private key) or neither")
    if server.plain_listen and not server.tls:
        raise ConfigError("server.plain_listen: only with TLS on server.listen (else use server.listen)")
    for key in ("tls_handshake_timeout", "header_timeout", "idle_timeout"):
        if getattr(server, key) <= 0:
            raise ConfigError(f"server.{key}: must be > 0 seconds")
    if server.max_connections < 1:
        raise ConfigError("server.max_connections: must be >= 1")
    for network in server.trusted_proxies:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"server.trusted_proxies: {network!r} is not an address or CIDR") from None


def _validate_access(config: Config) -> None:
    access = config.access
    modes = access.modes
    if not modes or any(m not in ACCESS_MODES for m in modes) or len(set(modes)) != len(modes):
        raise ConfigError(f"access.mode: one or more of {', '.join(ACCESS_MODES)}, got {access.mode!r}")
    if len(modes) > 1 and "anonymous" in modes:
        raise ConfigError("access.mode: anonymous cannot be combined with login modes")
    if access.uses("htpasswd") and not os.path.isfile(access.htpasswd):
        raise ConfigError("access.htpasswd: mode htpasswd needs a readable htpasswd file (bcrypt entries)")
    if access.uses("ldap"):
        _validate_ldap(access.ldap)
    if access.token:
        _validate_token(config)
    if access.oidc.issuer:
        _validate_oidc(access.oidc)
        if access.modes == ("anonymous",):
            raise ConfigError("access.oidc: needs a login mode (htpasswd, ldap or mtls) beside it")
    if access.uses("mtls"):
        if not config.server.tls:
            raise ConfigError("access.mode mtls: needs TLS (server.tls_cert and server.tls_key)")
        if not os.path.isfile(access.client_ca):
            raise ConfigError(
                "access.client_ca: mode mtls needs the CA bundle that signs client certificates"
            )
    if access.login_cache < 0 or access.max_failures < 1:
        raise ConfigError("access.login_cache must be >= 0 and access.max_failures >= 1")
    exposed = [
        listen
        for listen, _tls in config.server.listeners()
        if not _is_loopback(split_host_port(listen, "server.listen")[0])
    ]
    anonymous_rules = any(rule.identity == "anonymous" for rule in access.rules)
    if exposed and access.mode == "anonymous" and not anonymous_rules:
        raise ConfigError(
            f"server.listen {exposed[0]} is not loopback: choose who may pull. Set access.mode to "
            "htpasswd or mtls, or allow anonymous pulls explicitly with an [[access.rules]] entry for "
            'identity "anonymous" (e.g. allow = ["*"])'
        )


def _validate_ldap(ldap: LdapConfig) -> None:
    scheme = urlsplit(ldap.url).scheme
    if scheme not in ("ldap", "ldaps"):
        raise ConfigError(
            f"access.ldap.url: expected ldaps://HOST[:PORT] or ldap://HOST[:PORT], got {ldap.url!r}"
        )
    if scheme == "ldaps" and ldap.start_tls:
        raise ConfigError("access.ldap.start_tls: not with ldaps:// (already TLS)")
    if scheme == "ldap" and not ldap.start_tls and not ldap.allow_plain:
        raise ConfigError(
            "access.ldap.url: ldap:// sends passwords in clear; use ldaps://, start_tls = true, or say "
            "allow_plain = true"
        )
    if ldap.ca_file and not os.path.isfile(ldap.ca_file):
        raise ConfigError(f"access.ldap.ca_file: cannot read {ldap.ca_file}")
    if not ldap.base_dn or "{user}" not in ldap.user_filter:
        raise ConfigError("access.ldap.base_dn must be set, and access.ldap.user_filter must contain {user}")
    if ldap.bind_dn and not os.path.isfile(ldap.bind_password_file):
        raise ConfigError("access.ldap.bind_password_file: the service account's password file is needed")
    if ldap.group_base_dn and "{dn}" not in ldap.group_filter:
        raise ConfigError("access.ldap.group_filter: must contain {dn}")
    if ldap.connect_timeout <= 0 or ldap.response_timeout <= 0 or ldap.max_concurrent < 1:
        raise ConfigError("access.ldap: timeouts must be > 0 and max_concurrent >= 1")


def _validate_oidc(oidc: OidcConfig) -> None:
    for key, url in (("issuer", oidc.issuer), ("jwks_url", oidc.jwks_url)):
        scheme = urlsplit(url).scheme
        if url and scheme not in ("https", "http"):
            raise ConfigError(f"access.oidc.{key}: an https URL, got {url!r}")
        if scheme == "http" and not oidc.allow_plain:
            raise ConfigError(
                f"access.oidc.{key}: http:// lets the keys be swapped; use https or allow_plain"
            )
    if not oidc.audience:
        raise ConfigError("access.oidc.audience: must be set (the mirror's client id at the issuer)")
    bad = [a for a in oidc.algorithms if a not in OIDC_ALGORITHMS]
    if bad or not oidc.algorithms:
        allowed = ", ".join(OIDC_ALGORITHMS)
        raise ConfigError(f"access.oidc.algorithms: asymmetric ones only ({allowed}), got {bad or 'none'}")
    if oidc.ca_file and not os.path.isfile(oidc.ca_file):
        raise ConfigError(f"access.oidc.ca_file: cannot read {oidc.ca_file}")
    if oidc.fetch_timeout <= 0 or oidc.refresh_interval < 0 or oidc.keys_ttl <= 0:
        raise ConfigError("access.oidc: fetch_timeout and keys_ttl must be > 0, refresh_interval >= 0")
    if not oidc.identity_claim:
        raise ConfigError("access.oidc.identity_claim: must be set")


def _validate_token(config: Config) -> None:
    access = config.access
    if not access.logins:
        raise ConfigError("access.token: needs a login mode (htpasswd, ldap or mtls)")
    if not os.path.isfile(access.token_key):
        raise ConfigError("access.token_key: the token service needs a PEM private key file (EC or RSA)")
    if not 10 <= access.token_ttl <= 86_400:
        raise ConfigError("access.token_ttl: between 10 and 86400 seconds")
    if not access.token_service:
        raise ConfigError("access.token_service: must be set")
    if access.token_realm and urlsplit(access.token_realm).scheme not in ("http", "https"):
        raise ConfigError("access.token_realm: an http(s) URL, e.g. https://edge.dc1:5000/token")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _validate_shared(shared: SharedConfig) -> None:
    if not shared.enabled:
        return
    parts = urlsplit(shared.endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"shared.endpoint: expected http(s)://HOST[:PORT], got {shared.endpoint!r}")
    if not shared.bucket:
        raise ConfigError("shared.bucket: required when shared.endpoint is set")
    if shared.prefix.startswith("/"):
        raise ConfigError("shared.prefix: must not start with '/'")
    for key in ("connect_timeout", "header_timeout", "stall_timeout", "rate_window", "down_for"):
        if not getattr(shared, key) > 0:
            raise ConfigError(f"shared.{key}: must be > 0 seconds")
    parse_size(shared.min_rate, "shared.min_rate")
    parse_size(shared.multipart_threshold, "shared.multipart_threshold")
    if shared.down_after < 1 or shared.upload_concurrency < 1 or shared.upload_queue < 1:
        raise ConfigError("shared.down_after, upload_concurrency and upload_queue: must be >= 1")
    for key in ("ca_bundle", "credentials_file"):
        path = getattr(shared, key)
        if path and not os.path.isfile(os.path.expanduser(path)):
            raise ConfigError(f"shared.{key}: {path} is not a readable file")
