"""Who may pull what: htpasswd logins and mutual TLS, per-repository rules on every pull route, and
repositories that cannot read each other's content by digest. Against a real `edgecache serve`, with
curl as the client; the upstream is the origin registry behind a recording proxy, so the test can see
that no client credential ever reaches it."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import bcrypt
import pytest

from tests.conftest import Seeded, spawn_edge
from tests.support.certs import TestCA, wait_for_serial
from tests.support.curl import CurlResult, curl
from tests.support.faults import FaultProxy
from tests.support.logs import access_written
from tests.support.registry import Registry, free_port
from tests.support.waiting import wait_until

PASSWORDS = {"alice": "alice-pass-1", "bob": "bob-pass-2"}
MANIFEST_ACCEPT = (
    "Accept: application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"
)


def write_htpasswd(path: Path) -> Path:
    lines = [
        f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(4)).decode()}" for user, pw in PASSWORDS.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def htpasswd_config(tmp_path: Path, max_failures: int = 10) -> str:
    htpasswd = write_htpasswd(tmp_path / "htpasswd")
    return f"""
[access]
mode = "htpasswd"
htpasswd = "{htpasswd}"
max_failures = {max_failures}

[[access.rules]]
identity = "alice"
allow = ["docker.io/library/*"]

[[access.rules]]
identity = "bob"
allow = ["*"]
deny = ["docker.io/team/*"]

[[access.rules]]
identity = "anonymous"
allow = ["docker.io/library/alpine"]
"""


@pytest.fixture
async def recording_upstream(origin: Registry, seeded: Seeded) -> AsyncIterator[FaultProxy]:
    proxy = await FaultProxy(origin.url).start()
    yield proxy
    await proxy.stop()


def paths(seeded: Seeded, repo: str) -> dict[str, str]:
    image = seeded.alpine if repo == "library/alpine" else seeded.app if repo == "team/app" else None
    assert image is not None
    return {
        "manifest-tag": f"/v2/{repo}/manifests/{'latest' if repo == 'library/alpine' else '1.0'}",
        "manifest-digest": f"/v2/{repo}/manifests/{image.manifest.digest}",
        "blob": f"/v2/{repo}/blobs/{image.layers[0].digest}",
        "tags": f"/v2/{repo}/tags/list",
        "referrers": f"/v2/{repo}/referrers/{image.manifest.digest}",
    }


async def request(url: str, user: str | None, method: str = "GET") -> CurlResult:
    credentials = f"{user}:{PASSWORDS[user]}" if user else None
    return await asyncio.to_thread(curl, url, user=credentials, method=method, headers=(MANIFEST_ACCEPT,))


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_rules_apply_to_every_pull_route_and_deny_wins(
    tmp_path: Path, recording_upstream: FaultProxy, seeded: Seeded, method: str
) -> None:
    with spawn_edge(tmp_path, recording_upstream.url, config=htpasswd_config(tmp_path)) as edge:
        # (identity, repository) → allowed?  alice: library/* only; bob: everything but team/*
        # (deny wins over his allow-all); anonymous: library/alpine only.
        cases = [
            (None, "library/alpine", True),
            (None, "team/app", False),
            ("alice", "library/alpine", True),
            ("alice", "team/app", False),
            ("bob", "library/alpine", True),
            ("bob", "team/app", False),
        ]
        for user, repo, allowed in cases:
            for route, path in paths(seeded, repo).items():
                got = await request(edge.url + path, user, method)
                where = f"{user or 'anonymous'} {method} {route} {repo}"
                if allowed:
                    # referrers: the origin (distribution 2.8) has no referrers API and says 404
                    assert got.status in ((200, 404) if route == "referrers" else (200,)), where
                    continue
                expected = 401 if user is None else 403
                assert got.status == expected, where
                if method == "GET":
                    code = got.json()["errors"][0]["code"]  # type: ignore[index]
                    assert code == ("UNAUTHORIZED" if user is None else "DENIED"), where
                if user is None:  # anonymous is asked to log in, with HTTP Basic
                    assert got.headers["www-authenticate"].startswith('Basic realm="edgecache"'), where
        # Docker Hub's short names are checked as the upstream names them: `alpine` is library/alpine
        # (allowed to anonymous), and bob's deny of team/* cannot be dodged by any spelling.
        short = await request(f"{edge.url}/v2/alpine/manifests/latest", None, method)
        assert short.status == 200
        assert (await request(f"{edge.url}/v2/docker.io/team/app/manifests/1.0", "bob", method)).status == 403
        # the /v2/ ping asks anonymous clients to log in (that is how dockerd learns to send its
        # credentials), and welcomes a valid login
        assert (await request(f"{edge.url}/v2/", None, method)).status == 401
        assert (await request(f"{edge.url}/v2/", "alice", method)).status == 200
    # Nothing the clients sent reached the upstream: edgecache asks it with its own (no) credentials.
    secrets = [base64.b64encode(f"{u}:{p}".encode()).decode() for u, p in PASSWORDS.items()]
    assert recording_upstream.seen
    for seen in recording_upstream.seen:
        assert "Authorization" not in seen.headers and "authorization" not in seen.headers
        assert not any(s in json.dumps(seen.headers) for s in secrets)
    log_text = edge.log_path.read_text()
    assert not any(pw in log_text for pw in PASSWORDS.values())
    assert not any(s in log_text for s in secrets)


async def test_wrong_passwords_are_refused_then_rate_limited_per_client(
    tmp_path: Path, recording_upstream: FaultProxy, seeded: Seeded
) -> None:
    with spawn_edge(tmp_path, recording_upstream.url, config=htpasswd_config(tmp_path, 3)) as edge:
        url = f"{edge.url}/v2/library/alpine/manifests/latest"
        assert (await request(url, "alice")).status == 200  # remembered for a while (login_cache)
        for user in ("alice", "nobody", "bob"):  # wrong password, unknown user: the same answer
            got = await asyncio.to_thread(curl, url, user=f"{user}:wrong", headers=(MANIFEST_ACCEPT,))
            assert got.status == 401 and got.json()["errors"][0]["code"] == "UNAUTHORIZED"  # type: ignore[index]
        limited = await asyncio.to_thread(curl, url, user="bob:bob-pass-2", headers=(MANIFEST_ACCEPT,))
        assert limited.status == 429 and int(limited.headers["retry-after"]) > 0
        assert limited.json()["errors"][0]["code"] == "TOOMANYREQUESTS"  # type: ignore[index]
        # A login checked before the failures is still remembered; a forged X-Forwarded-For does
        # not reset the count (it is believed only from trusted proxies).
        assert (await request(url, "alice")).status == 200
        forged = await asyncio.to_thread(
            curl, url, user="bob:bob-pass-2", headers=(MANIFEST_ACCEPT, "X-Forwarded-For: 10.9.9.9")
        )
        assert forged.status == 429
        malformed = await asyncio.to_thread(
            curl, url, headers=(MANIFEST_ACCEPT, "Authorization: Basic !!!not-base64")
        )
        assert malformed.status in (401, 429)


def serve_fails(tmp_path: Path, origin: Registry, config: str, *flags: str) -> str:
    (tmp_path / "bad.toml").write_text(config)
    command = [
        sys.executable, "-m", "edgecache", "serve", "--config", str(tmp_path / "bad.toml"),
        "--upstream", origin.url, "--cache-dir", str(tmp_path / "cache"), *flags,
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    return run.stderr


def test_exposed_listeners_make_the_operator_choose_and_only_bcrypt_is_accepted(
    tmp_path: Path, origin: Registry
) -> None:
    port = free_port()
    exposed = serve_fails(tmp_path, origin, "", "--listen", f"0.0.0.0:{port}")
    assert "is not loopback" in exposed and "anonymous" in exposed
    md5 = tmp_path / "md5.htpasswd"
    md5.write_text("carol:$apr1$salt$0123456789abcdefghijkl\n")
    refused = serve_fails(tmp_path, origin, f'[access]\nmode = "htpasswd"\nhtpasswd = "{md5}"\n')
    assert "line 1" in refused and "bcrypt" in refused
    unknown = serve_fails(tmp_path, origin, '[access]\nmode = "kerberos"\n')
    assert "access.mode" in unknown
    no_directory = serve_fails(tmp_path, origin, '[access]\nmode = "ldap"\n')
    assert "access.ldap.url" in no_directory


async def test_mutual_tls_identity_is_the_certificate_subject(
    tmp_path: Path, recording_upstream: FaultProxy, seeded: Seeded
) -> None:
    ca = TestCA(tmp_path / "pki")
    server, renewed = ca.issue("edge"), ca.issue("edge-renewed")
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live-key.pem"
    shutil.copy(server.cert, live_cert)
    shutil.copy(server.key, live_key)
    puller, stranger = ca.issue("puller", client=True), ca.issue("stranger", client=True)
    outsider_ca = TestCA(tmp_path / "other-pki", "another CA")
    forged = outsider_ca.issue("puller", client=True)  # same subject, signed by someone else
    config = f"""
[server]
tls_cert = "{live_cert}"
tls_key = "{live_key}"
[access]
mode = "mtls"
client_ca = "{ca.cert_path}"
[[access.rules]]
identity = "CN=puller"
allow = ["docker.io/library/*"]
"""
    with spawn_edge(tmp_path, recording_upstream.url, config=config, tls=True) as edge:
        url = f"{edge.url}/v2/library/alpine/manifests/latest"

        async def with_cert(cert: tuple[Path, Path] | None, target: str = url) -> CurlResult:
            return await asyncio.to_thread(
                curl, target, cacert=ca.cert_path, cert=cert, headers=(MANIFEST_ACCEPT,)
            )

        ok = await with_cert((puller.cert, puller.key))
        assert ok.status == 200 and ok.body == seeded.alpine.manifest.data
        team = await with_cert((puller.cert, puller.key), f"{edge.url}/v2/team/app/manifests/1.0")
        assert team.status == 403
        assert (await with_cert((stranger.cert, stranger.key))).status == 403  # valid, but no rule
        no_cert = await with_cert(None)
        assert no_cert.returncode != 0 and no_cert.status == 0  # the handshake itself fails
        outsider = await with_cert((forged.cert, forged.key))
        assert outsider.returncode != 0 and outsider.status == 0
        await access_written(
            edge.log_path,
            lambda records: {"CN=puller", "CN=stranger"} <= {r["identity"] for r in records},
            "no access lines naming both certificate subjects",
        )
        # A renewed server certificate is taken on SIGHUP by this listener too.
        shutil.copy(renewed.cert, live_cert)
        shutil.copy(renewed.key, live_key)
        edge.proc.send_signal(signal.SIGHUP)
        port = int(edge.url.rsplit(":", 1)[1])
        await asyncio.to_thread(wait_for_serial, port, renewed.serial, streak=3)
        assert (await with_cert((puller.cert, puller.key))).status == 200


ANONYMOUS_RULE = '[[access.rules]]\nidentity = "anonymous"\nallow = ["docker.io/*"]\n'


async def test_a_repository_cannot_read_another_repositorys_content_by_digest(
    tmp_path: Path, recording_upstream: FaultProxy, seeded: Seeded
) -> None:
    # With a rule, the repository check protects something (with anonymous access, no rules and no
    # upstream credentials it would not, and is off: test_index_recovery.py).
    with spawn_edge(tmp_path, recording_upstream.url, config=ANONYMOUS_RULE) as edge:
        alpine = seeded.alpine
        layer = alpine.layers[-1]
        for path in (f"/v2/library/alpine/blobs/{layer.digest}", "/v2/library/alpine/manifests/latest"):
            assert (await request(edge.url + path, None)).status == 200  # now cached
        before = len(recording_upstream.seen)
        # The blob and the manifest are on disk, but team/app is not known to hold them: upstream is
        # asked under team/app (HEAD), says no, and the client gets a 404, not alpine's bytes.
        blob = await request(f"{edge.url}/v2/team/app/blobs/{layer.digest}", None)
        assert blob.status == 404 and blob.json()["errors"][0]["code"] == "BLOB_UNKNOWN"  # type: ignore[index]
        manifest = await request(f"{edge.url}/v2/team/app/manifests/{alpine.manifest.digest}", None)
        assert manifest.status == 404
        asked = [(s.method, s.path_qs) for s in recording_upstream.seen[before:]]
        assert ("HEAD", f"/v2/team/app/blobs/{layer.digest}") in asked
        # Under its own repository the same digest is a hit, with no upstream request at all.
        before = len(recording_upstream.seen)
        again = await request(f"{edge.url}/v2/library/alpine/blobs/{layer.digest}", None)
        assert again.status == 200 and again.headers["x-cache"] == "HIT"
        by_digest = await request(f"{edge.url}/v2/library/alpine/manifests/{alpine.manifest.digest}", None)
        assert by_digest.status == 200 and by_digest.headers["x-cache"] == "HIT"
        assert len(recording_upstream.seen) == before
    # Known memberships survive a restart (index), so the hit needs no upstream after it either.
    with spawn_edge(tmp_path, recording_upstream.url, config=ANONYMOUS_RULE) as edge:
        before = len(recording_upstream.seen)
        again = await request(f"{edge.url}/v2/library/alpine/blobs/{layer.digest}", None)
        assert again.status == 200 and again.headers["x-cache"] == "HIT"
        assert len(recording_upstream.seen) == before


async def test_sighup_rereads_htpasswd_and_rules_but_not_the_mode(
    tmp_path: Path, recording_upstream: FaultProxy, seeded: Seeded
) -> None:
    config_text = htpasswd_config(tmp_path)
    with spawn_edge(tmp_path, recording_upstream.url, config=config_text) as edge:
        url = f"{edge.url}/v2/library/alpine/manifests/latest"
        carol = "carol:carol-pass-3"
        assert (await asyncio.to_thread(curl, url, user=carol, headers=(MANIFEST_ACCEPT,))).status == 401
        htpasswd = tmp_path / "htpasswd"
        carol_hash = bcrypt.hashpw(b"carol-pass-3", bcrypt.gensalt(4)).decode()
        htpasswd.write_text(htpasswd.read_text() + f"carol:{carol_hash}\n")
        # ...a rule for her, and an attempt to switch the mode, which needs other listeners: kept, logged.
        new_config = config_text.replace('mode = "htpasswd"', 'mode = "anonymous"')
        new_config += '\n[[access.rules]]\nidentity = "carol"\nallow = ["docker.io/library/alpine"]\n'
        (tmp_path / "edgecache.toml").write_text(new_config)
        edge.proc.send_signal(signal.SIGHUP)
        await wait_until(  # the last line of a reload: the new htpasswd and rules are in force
            lambda: "configuration reloaded" in edge.log_path.read_text(), message="SIGHUP not handled"
        )
        assert "access.mode or access.client_ca changed; that takes a restart" in edge.log_path.read_text()
        assert (await asyncio.to_thread(curl, url, user=carol, headers=(MANIFEST_ACCEPT,))).status == 200
        team = f"{edge.url}/v2/team/app/manifests/1.0"
        assert (await request(team, None)).status == 401  # still htpasswd: anonymous is asked to log in


async def test_x_forwarded_for_is_believed_from_a_trusted_proxy_only(
    tmp_path: Path, recording_upstream: FaultProxy, seeded: Seeded
) -> None:
    """Behind a trusted load balancer the client's address is the nearest untrusted X-Forwarded-For
    hop: the access log shows it, and failed logins are counted under it, not the balancer's."""
    config = htpasswd_config(tmp_path, max_failures=2) + '[server]\ntrusted_proxies = ["127.0.0.0/8"]\n'
    with spawn_edge(tmp_path, recording_upstream.url, config=config) as edge:
        url = f"{edge.url}/v2/library/alpine/manifests/latest"

        async def as_client(address: str, user: str) -> CurlResult:
            chain = f"X-Forwarded-For: {address}, 127.0.0.9"  # the client, then another trusted hop
            return await asyncio.to_thread(curl, url, user=user, headers=(MANIFEST_ACCEPT, chain))

        for _ in range(2):
            assert (await as_client("203.0.113.7", "bob:wrong")).status == 401
        assert (await as_client("203.0.113.7", "bob:bob-pass-2")).status == 429  # that client is limited
        assert (await as_client("198.51.100.4", "bob:bob-pass-2")).status == 200  # another is not
        records = await access_written(
            edge.log_path,
            lambda records: {"203.0.113.7", "198.51.100.4"} <= {r["peer"] for r in records},
            "no access lines for both forwarded clients",
        )
        assert "127.0.0.9" not in {r["peer"] for r in records}
