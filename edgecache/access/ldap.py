"""Logins checked against an LDAP directory: find the user's DN as a service account, bind as the user,
read the user's groups.

ldap3 (pure Python, the most used LDAP client for Python, LDAPS/StartTLS with a CA file, connect and
receive timeouts) is synchronous, so each check runs in a small pool of its own threads: a directory
that hangs ties up those threads, never the event loop nor the default pool bcrypt and file I/O use.
Every check has an overall deadline on top of ldap3's socket timeouts; missing it, or any error that
is not a clear "wrong password", is DirectoryUnavailable (503): nobody is let in on a doubt.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import re
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ldap3 import SIMPLE, SUBTREE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import parse_dn

from edgecache import errors
from edgecache.config import LdapConfig
from edgecache.errors import ConfigError

log = logging.getLogger(__name__)


class LdapDirectory:
    """One directory's settings and threads. `check` answers the user's groups, or None for a wrong
    password or an unknown user; raises DirectoryUnavailable when the directory cannot tell."""

    def __init__(self, config: LdapConfig) -> None:
        self._config = config
        self._bind_password = _read_secret(config.bind_password_file) if config.bind_dn else ""
        url = urlsplit(config.url)
        secure = url.scheme == "ldaps" or config.start_tls
        tls = Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=config.ca_file or None) if secure else None
        self._server_args: dict[str, Any] = {
            "host": url.hostname or "",
            "port": url.port or (636 if url.scheme == "ldaps" else 389),
            "use_ssl": url.scheme == "ldaps",
            "tls": tls,
            "connect_timeout": config.connect_timeout,
            "get_info": "NO_INFO",
        }
        self._pool = concurrent.futures.ThreadPoolExecutor(config.max_concurrent, thread_name_prefix="ldap")
        # Bound on one whole check: connect, StartTLS, two binds and up to two searches.
        self._deadline = config.connect_timeout * 2 + config.response_timeout * 5
        # The attribute users are named by (read back to compare with the typed name), and what the
        # user search asks for: both fixed by the configuration.
        self._named_by = _name_attribute(config.user_filter)
        self._user_attributes = tuple(a for a in (config.group_attribute, self._named_by) if a)

    def close(self) -> None:
        """Stop taking new checks (a reload); those under way finish, each within its socket timeouts."""
        self._pool.shutdown(wait=False)

    async def check(self, user: str, password: str) -> frozenset[str] | None:
        if not password:  # an empty password is an "unauthenticated bind" that LDAP servers accept
            return None
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, self._check, user, password)
        try:
            async with asyncio.timeout(self._deadline):
                return await future
        except TimeoutError:
            log.warning("LDAP directory %s did not answer within %g s", self._config.url, self._deadline)
            raise errors.DirectoryUnavailable(retry_after=5) from None

    def _check(self, user: str, password: str) -> frozenset[str] | None:
        """In a worker thread: the whole exchange with the directory. A Server object per check: ldap3's
        remembers an unreachable address for a while (and is not meant to be shared by threads), and a
        directory back up must be used at once."""
        config = self._config
        server = Server(**self._server_args)
        try:
            service = self._connection(server, config.bind_dn or None, self._bind_password or None)
            try:
                if not service.bind():
                    log.error(
                        "LDAP service account bind refused by %s (result %s)", config.url, service.result
                    )
                    raise errors.DirectoryUnavailable(retry_after=5)
                user_filter = config.user_filter.replace("{user}", escape_filter_chars(user))
                named_by = self._named_by
                service.search(
                    config.base_dn, user_filter, SUBTREE, attributes=list(self._user_attributes), size_limit=2
                )
                _answered(service, config.url, SIZE_LIMIT_EXCEEDED)  # two matches: ambiguous, below
                entries = [e for e in service.response or [] if e.get("type") == "searchResEntry"]
                if len(entries) != 1:
                    return None  # unknown, or ambiguous: either way not this login
                dn: str = entries[0]["dn"]
                if named_by and user not in _values(entries[0].get("attributes", {}), named_by):
                    # The directory matched `CAROL` or ` carol ` to carol's entry (its matching
                    # ignores case and spaces), but rules, tokens and the log would take the name as
                    # typed: a deny rule for `carol` would not apply. Only the name as stored logs in.
                    return None
                if not self._user_binds(server, dn, password):
                    return None
                groups = set(_names(_values(entries[0].get("attributes", {}), config.group_attribute)))
                if config.group_base_dn:
                    group_filter = config.group_filter.replace("{dn}", escape_filter_chars(dn))
                    service.search(
                        config.group_base_dn, group_filter, SUBTREE, attributes=[config.group_name_attribute]
                    )
                    _answered(service, config.url)  # a partial list of groups would skip deny rules
                    for entry in service.response or []:
                        if entry.get("type") == "searchResEntry":
                            attrs = entry.get("attributes", {})
                            groups.update(_values(attrs, config.group_name_attribute))
                return frozenset(groups)
            finally:
                _close(service)
        except errors.DirectoryUnavailable:
            raise
        except Exception as exc:  # socket, TLS, protocol: the directory cannot tell, so nobody is let in
            log.warning("LDAP directory %s failed: %s", config.url, type(exc).__name__)
            raise errors.DirectoryUnavailable(retry_after=5) from None

    def _user_binds(self, server: Server, dn: str, password: str) -> bool:
        """The user's own bind on a fresh connection: the directory checks the password."""
        connection = self._connection(server, dn, password)
        try:
            if connection.bind():
                return True
            if (connection.result or {}).get("result") == INVALID_CREDENTIALS:
                return False  # a wrong password
            # busy, unavailable, unwilling: the directory did not say no, so this is not a failed login
            log.warning("LDAP directory %s refused a bind: result %s", self._config.url, connection.result)
            raise errors.DirectoryUnavailable(retry_after=5)
        finally:
            _close(connection)

    def _connection(self, server: Server, user: str | None, password: str | None) -> Connection:
        config = self._config
        connection = Connection(
            server,
            user=user,
            password=password,
            authentication=SIMPLE if user else "ANONYMOUS",
            receive_timeout=max(1, math.ceil(config.response_timeout)),  # ldap3 packs it as an integer
            read_only=True,
            raise_exceptions=False,
        )
        try:
            connection.open()
            if config.start_tls and not connection.start_tls():
                raise errors.DirectoryUnavailable(retry_after=5)
        except BaseException:
            _close(connection)
            raise
        return connection


SUCCESS, SIZE_LIMIT_EXCEEDED, INVALID_CREDENTIALS = 0, 4, 49  # LDAP result codes (RFC 4511)


def _answered(connection: Connection, url: str, *also: int) -> None:
    """Raise DirectoryUnavailable unless the last search completed (or ended with one of `also`):
    without raise_exceptions, ldap3 returns what arrived before a size limit, a busy server or an
    administrative limit, and a partial answer must never decide a login."""
    code = (connection.result or {}).get("result")
    if code != SUCCESS and code not in also:
        log.warning("LDAP directory %s answered a search with result %s", url, connection.result)
        raise errors.DirectoryUnavailable(retry_after=5)


def _close(connection: Connection) -> None:
    """Unbind, and close the socket even when the connection broke half-way (unbind then raises)."""
    with contextlib.suppress(Exception):  # the socket is closed below either way
        connection.unbind()
    sock = getattr(connection, "socket", None)
    if sock is not None:
        sock.close()


_NAMED_BY = re.compile(r"\(([A-Za-z][A-Za-z0-9-]*)=\{user\}\)")


def _name_attribute(user_filter: str) -> str | None:
    """The attribute a `(attr={user})` filter names users by (`uid`), or None for another shape."""
    found = _NAMED_BY.search(user_filter)
    return found.group(1) if found else None


def _values(attributes: Any, name: str) -> list[str]:
    if not name:
        return []
    value = attributes.get(name, [])
    return [str(v) for v in (value if isinstance(value, list) else [value])]


def _names(dns: list[str]) -> list[str]:
    """Group DNs (memberOf) → their names: the first RDN's value (`cn=ops,ou=groups,...` → `ops`)."""
    names = []
    for dn in dns:
        try:
            names.append(parse_dn(dn)[0][1])
        except (LDAPException, IndexError):
            continue
    return names


def _read_secret(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"access.ldap.bind_password_file: cannot read {path} ({exc})") from None
