"""LDAP logins against a real OpenLDAP slapd (tests/support/ldap.py): passwords checked by the
directory, groups in access rules, LDAPS and StartTLS with a test CA, and the directory going silent
or away mid-run (503 for logins not remembered, nobody let in, remembered logins still served, the
event loop never blocked). edgecache runs in-process on a real socket in front of the real origin."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgecache.access.ldap import LdapDirectory
from edgecache.config import Config, LdapConfig, load_config
from edgecache.errors import ConfigError, DirectoryUnavailable
from tests.conftest import Edge, Seeded, running_edge
from tests.support.ldap import PEOPLE, SERVICE_DN, SERVICE_PASSWORD, SUFFIX, Slapd, start_slapd
from tests.support.registry import Registry
from tests.test_access import write_htpasswd

MANIFEST_ACCEPT = (
    "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"
)
ALPINE = "/v2/library/alpine/manifests/latest"
APP = "/v2/team/app/manifests/1.0"


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    running = start_slapd(tmp_path_factory.mktemp("slapd"))
    yield running
    running.stop()


def ldap_config(
    tmp_path: Path, origin: Registry, slapd: Slapd, ldap: str, *, login_cache: float = 60, extra: str = ""
) -> Config:
    (tmp_path / "service-password").write_text(SERVICE_PASSWORD + "\n")
    htpasswd = write_htpasswd(tmp_path / "htpasswd")
    (tmp_path / "edgecache.toml").write_text(
        f"""
[access]
mode = ["htpasswd", "ldap"]
htpasswd = "{htpasswd}"
login_cache = {login_cache}

[access.ldap]
bind_dn = "{SERVICE_DN}"
bind_password_file = "{tmp_path / "service-password"}"
base_dn = "ou=people,{SUFFIX}"
ca_file = "{slapd.ca.cert_path}"
connect_timeout = 1
response_timeout = 1
{ldap}

[[access.rules]]
identity = "group:ops"
allow = ["docker.io/*"]

[[access.rules]]
identity = "group:devs"
allow = ["docker.io/library/*"]

[[access.rules]]
identity = "alice"
allow = ["docker.io/library/*"]
{extra}
"""
    )
    config = load_config(
        str(tmp_path / "edgecache.toml"), env={}, cache_dir=str(tmp_path / "cache"), upstreams=[origin.url]
    )
    return dataclasses.replace(config, prefetch=dataclasses.replace(config.prefetch, enabled=False))


def groups_by_search(slapd: Slapd) -> LdapConfig:
    """The directory over LDAPS, users bound as themselves, groups found by a search under
    ou=groups (not read from a member-of attribute)."""
    return LdapConfig(
        url=slapd.tls_url,
        ca_file=str(slapd.ca.cert_path),
        base_dn=f"ou=people,{SUFFIX}",
        group_attribute="",
        group_base_dn=f"ou=groups,{SUFFIX}",
    )


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def status(edge: Edge, path: str, user: str | None, password: str | None = None) -> int:
    headers = {"Accept": MANIFEST_ACCEPT}
    if user:
        headers.update(basic(user, PEOPLE.get(user, "") if password is None else password))
    async with edge.http.get(path, headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_ldaps_logins_and_group_rules(
    tmp_path: Path, origin: Registry, seeded: Seeded, slapd: Slapd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # Groups from the memberOf attribute (the overlay keeps it on each member).
    config = ldap_config(tmp_path, origin, slapd, f'url = "{slapd.tls_url}"')
    async with running_edge(config) as edge:
        # carol is in ops (everything on docker.io) and devs; dave in devs (library/* only); erin in
        # no group, so no rule allows her anything (logged in, refused: 403).
        assert await status(edge, APP, "carol") == 200
        assert await status(edge, ALPINE, "dave") == 200
        assert await status(edge, APP, "dave") == 403
        assert await status(edge, ALPINE, "erin") == 403
        # Wrong password, unknown user, empty password (an "unauthenticated bind" LDAP would accept):
        # the same 401.
        assert await status(edge, ALPINE, "carol", "wrong") == 401
        assert await status(edge, ALPINE, "nobody", "whatever") == 401
        assert await status(edge, ALPINE, "dave", "") == 401
        # A filter injection in the user name finds nobody.
        assert await status(edge, ALPINE, "*", PEOPLE["dave"]) == 401
        assert await status(edge, ALPINE, "dave)(uid=*", PEOPLE["dave"]) == 401
        # htpasswd comes first and still works beside the directory.
        assert await status(edge, ALPINE, "alice", "alice-pass-1") == 200
        assert await status(edge, APP, "alice", "alice-pass-1") == 403
    # No password reached a log line.
    for password in [*PEOPLE.values(), SERVICE_PASSWORD, "alice-pass-1"]:
        assert password not in caplog.text


async def test_starttls_group_search_and_a_reload(
    tmp_path: Path, origin: Registry, seeded: Seeded, slapd: Slapd
) -> None:
    group_search = f'group_attribute = ""\ngroup_base_dn = "ou=groups,{SUFFIX}"'
    config = ldap_config(tmp_path, origin, slapd, f'url = "{slapd.url}"\nstart_tls = true\n{group_search}')
    async with running_edge(config) as edge:
        assert await status(edge, APP, "carol") == 200
        assert await status(edge, APP, "dave") == 403
        # SIGHUP's reload: a rule for erin, and the directory's settings re-read (the same here).
        reloaded = ldap_config(
            tmp_path,
            origin,
            slapd,
            f'url = "{slapd.url}"\nstart_tls = true\n{group_search}',
            extra='[[access.rules]]\nidentity = "erin"\nallow = ["docker.io/team/*"]\n',
        )
        edge.instance.apply(reloaded)
        assert await status(edge, APP, "erin") == 200


async def test_a_directory_certificate_from_another_ca_lets_nobody_in(
    tmp_path: Path, origin: Registry, seeded: Seeded, slapd: Slapd
) -> None:
    from tests.support.certs import TestCA

    other = TestCA(tmp_path / "other-ca")
    config = ldap_config(tmp_path, origin, slapd, f'url = "{slapd.tls_url}"')
    config = dataclasses.replace(
        config,
        access=dataclasses.replace(
            config.access, ldap=dataclasses.replace(config.access.ldap, ca_file=str(other.cert_path))
        ),
    )
    async with running_edge(config) as edge:
        async with edge.http.get(ALPINE, headers=basic("carol", PEOPLE["carol"])) as resp:
            assert resp.status == 503
            body = await resp.json()
        assert body["errors"][0]["code"] == "UNAVAILABLE"


async def test_directory_silent_then_stopped(
    tmp_path: Path, origin: Registry, seeded: Seeded, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # A slapd of its own: this test stops it.
    own = start_slapd(tmp_path_factory.mktemp("slapd-own"))
    try:
        config = ldap_config(tmp_path, origin, own, f'url = "{own.tls_url}"', login_cache=3600)
        async with running_edge(config) as edge:
            assert await status(edge, ALPINE, "carol") == 200  # remembered from now on
            own.pause()  # accepts connections, answers nothing
            pending = asyncio.ensure_future(status(edge, ALPINE, "dave"))
            # The event loop is not blocked while dave's check waits on the directory: health,
            # metrics and carol's remembered login are served meanwhile.
            async with edge.http.get("/healthz") as resp:
                assert resp.status == 200
            assert await status(edge, ALPINE, "carol") == 200
            assert not pending.done()
            assert await pending == 503  # the deadline, not a hang, and nobody let in
            assert await status(edge, ALPINE, "dave", "wrong") == 503  # cannot tell: not a 401 either
            own.resume()
            own.stop()  # connection refused from now on
            assert await status(edge, ALPINE, "dave") == 503
            assert await status(edge, ALPINE, "erin") == 503
            assert await status(edge, ALPINE, "carol") == 200
            async with edge.http.get(ALPINE, headers=basic("dave", PEOPLE["dave"])) as resp:
                body = await resp.json()
                assert resp.headers["Content-Type"].startswith("application/json")
            assert body["errors"][0]["code"] == "UNAVAILABLE"
            checks = "edgecache_access_credential_checks_total"
            assert await edge.metric(checks, kind="password", result="unavailable") == 5
            assert await edge.metric(checks, kind="password", result="remembered") == 2
            assert await edge.metric(checks, kind="password", result="refused") == 0
            # Failures of the directory are not counted as failed logins: after it comes back,
            # dave gets in at once.
            own.start()
            assert await status(edge, ALPINE, "dave") == 200
    finally:
        own.stop()


async def test_plain_ldap_only_when_the_operator_says_so(
    tmp_path: Path, origin: Registry, seeded: Seeded, slapd: Slapd
) -> None:
    with pytest.raises(ConfigError, match="allow_plain"):
        ldap_config(tmp_path, origin, slapd, f'url = "{slapd.url}"')
    config = ldap_config(tmp_path, origin, slapd, f'url = "{slapd.url}"\nallow_plain = true')
    async with running_edge(config) as edge:
        assert await status(edge, APP, "carol") == 200
        assert await status(edge, APP, "carol", "wrong") == 401


async def test_a_partial_answer_from_the_directory_lets_nobody_in(tmp_path: Path) -> None:
    """A directory that stops a search early (here slapd's own `sizelimit 1`) still returns the
    entries it sent; a login must not be decided on them. carol is in two groups: with one of them
    only, a deny rule on the other would not apply to her. The login is refused as a directory
    failure (503 to the client), not let in with fewer groups."""
    slapd = start_slapd(tmp_path / "slapd")
    try:
        slapd.stop()
        conf = slapd.directory / "slapd.conf"
        conf.write_text(conf.read_text().replace("database mdb", "sizelimit 1\ndatabase mdb"))
        slapd.start()
        directory = LdapDirectory(groups_by_search(slapd))
        try:
            with pytest.raises(DirectoryUnavailable):
                await directory.check("carol", PEOPLE["carol"])
            assert await directory.check("erin", PEOPLE["erin"]) == frozenset()  # in no group: whole
        finally:
            directory.close()
    finally:
        slapd.stop()


async def test_only_the_name_as_the_directory_stores_it_logs_in(slapd: Slapd) -> None:
    """slapd matches `uid` ignoring case and surrounding spaces; rules, tokens and the access log take
    the name as typed. So `CAROL` must not log in as carol: a deny rule written for `carol` would
    not apply to that login."""
    directory = LdapDirectory(groups_by_search(slapd))
    try:
        assert await directory.check("carol", PEOPLE["carol"]) == frozenset({"ops", "devs"})
        for typed in ("CAROL", "Carol", " carol", "carol "):
            assert await directory.check(typed, PEOPLE["carol"]) is None, typed
    finally:
        directory.close()
