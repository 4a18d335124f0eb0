"""The token service (access.token = true): 401s name the realm, service and scope; /token checks a
login once and signs a token granting only what the rules allow; later requests are checked locally.

HTTP-level tests run in-process on a real socket (aiohttp as the client, so the raw headers are
visible); skopeo and dockerd log in and pull through a real `edgecache serve` on the TLS listener.
Forged tokens (expired, another key, `alg: none`) are made with PyJWT and the test's own key file.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edgecache.access.tokens import ISSUER, MAX_SCOPES, load_key
from edgecache.config import Config, load_config
from tests.conftest import Edge, Seeded, running_edge, spawn_edge
from tests.support.certs import TestCA
from tests.support.clients import (
    Dockerd,
    client_env,
    require_binary,
    require_clients,
    require_root,
    skopeo_copy_all,
)
from tests.support.curl import curl
from tests.support.faults import FaultProxy
from tests.support.ldap import PEOPLE, SERVICE_DN, SERVICE_PASSWORD, SUFFIX, Slapd, start_slapd
from tests.support.logs import access_records
from tests.support.registry import Registry
from tests.test_access import PASSWORDS, write_htpasswd
from tests.test_pure_identity import write_key

MANIFEST_ACCEPT = (
    "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.oci.image.index.v1+json"
)
ALPINE = "/v2/library/alpine/manifests/latest"
APP = "/v2/team/app/manifests/1.0"
RULES = """
[[access.rules]]
identity = "alice"
allow = ["docker.io/library/*"]

[[access.rules]]
identity = "bob"
allow = ["*"]

[[access.rules]]
identity = "group:ops"
allow = ["docker.io/*"]

[[access.rules]]
identity = "anonymous"
allow = ["docker.io/library/multi"]
"""


def token_toml(tmp_path: Path, *, extra: str = "", mode: str = '"htpasswd"', key: str = "token.pem") -> str:
    htpasswd = write_htpasswd(tmp_path / "htpasswd")
    if not (tmp_path / key).exists():
        write_key(tmp_path / key)
    return f"""
[access]
mode = {mode}
htpasswd = "{htpasswd}"
token = true
token_key = "{tmp_path / key}"
token_ttl = 120
login_cache = 0
{extra}
{RULES}
"""


def in_process_config(tmp_path: Path, origin: Registry, toml: str) -> Config:
    (tmp_path / "edgecache.toml").write_text(toml)
    config = load_config(
        str(tmp_path / "edgecache.toml"), env={}, cache_dir=str(tmp_path / "cache"), upstreams=[origin.url]
    )
    return dataclasses.replace(config, prefetch=dataclasses.replace(config.prefetch, enabled=False))


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def get(
    edge: Edge, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with edge.http.get(path, headers={"Accept": MANIFEST_ACCEPT, **(headers or {})}) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def token_for(edge: Edge, scope: str, headers: dict[str, str] | None = None) -> str:
    status, _, body = await get(edge, f"/token?service=edgecache&scope={scope}", headers)
    assert status == 200, body
    document = json.loads(body)
    assert document["token"] == document["access_token"] and document["expires_in"] == 120
    return str(document["token"])


def challenge(headers: dict[str, str]) -> dict[str, str]:
    value = headers["WWW-Authenticate"]
    assert value.startswith("Bearer ")
    return dict(re.findall(r'(\w+)="([^"]*)"', value))


async def test_the_token_flow_grants_only_what_the_rules_allow_and_refuses_forgeries(
    tmp_path: Path, origin: Registry, seeded: Seeded
) -> None:
    async with running_edge(in_process_config(tmp_path, origin, token_toml(tmp_path))) as edge:
        # Anonymous: the challenge names this node's /token, the service and the scope asked.
        status, headers, _ = await get(edge, APP)
        assert status == 401
        assert challenge(headers) == {
            "realm": f"{edge.url}/token",
            "service": "edgecache",
            "scope": "repository:team/app:pull",
        }
        status, headers, _ = await get(edge, "/v2/")
        assert status == 401 and "scope" not in challenge(headers)
        # A failed login before the name is checked: a name outside the grammar is not echoed.
        status, headers, _ = await get(edge, "/v2/Not,A=Name/manifests/latest", basic("alice", "wrong"))
        assert status == 401 and "scope" not in challenge(headers)

        # alice logs in once and gets a token for library/alpine; it lists only that repository.
        token = await token_for(edge, "repository:library/alpine:pull", basic("alice", PASSWORDS["alice"]))
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["sub"] == "alice"
        assert claims["access"] == [{"type": "repository", "name": "library/alpine", "actions": ["pull"]}]
        assert (await get(edge, ALPINE, bearer(token)))[0] == 200
        assert (await get(edge, "/v2/", bearer(token)))[0] == 200
        # ... and is refused for another repository, even one her rules allow (library/multi).
        status, headers, _ = await get(edge, "/v2/library/multi/manifests/v1", bearer(token))
        assert status == 401 and challenge(headers)["scope"] == "repository:library/multi:pull"
        # A scope the rules refuse is not granted: the token lists nothing, so team/app stays closed.
        token = await token_for(edge, "repository:team/app:pull", basic("alice", PASSWORDS["alice"]))
        assert jwt.decode(token, options={"verify_signature": False})["access"] == []
        assert (await get(edge, APP, bearer(token)))[0] == 401
        # Too many scopes for one token (it would not fit in a header): 400 in OCI JSON, no token.
        scopes = "&".join(f"scope=repository:team/app{i}:pull" for i in range(MAX_SCOPES + 1))
        status, _, body = await get(edge, f"/token?{scopes}", basic("alice", PASSWORDS["alice"]))
        assert status == 400 and json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
        # Tokens are not content: /token's bodies do not count as bytes served.
        served = await edge.metric("edgecache_served_bytes_total", source="memory")
        await token_for(edge, "repository:library/alpine:pull", basic("alice", PASSWORDS["alice"]))
        assert await edge.metric("edgecache_served_bytes_total", source="memory") == served
        # Wrong password at /token: 401, no token. Push is never granted.
        assert (await get(edge, "/token?scope=repository:library/alpine:pull", basic("alice", "x")))[0] == 401
        token = await token_for(edge, "repository:team/app:pull,push", basic("bob", PASSWORDS["bob"]))
        assert jwt.decode(token, options={"verify_signature": False})["access"][0]["actions"] == ["pull"]
        assert (await get(edge, APP, bearer(token)))[0] == 200
        # Anonymous clients get a token for what anonymous may pull, nothing else.
        anonymous = await token_for(edge, "repository:library/multi:pull")
        assert (await get(edge, "/v2/library/multi/manifests/v1", bearer(anonymous)))[0] == 200
        anonymous = await token_for(edge, "repository:library/alpine:pull")
        assert (await get(edge, ALPINE, bearer(anonymous)))[0] == 401

        # Forgeries: expired, signed by another key, alg none. All 401 with a Bearer challenge.
        key = load_key(str(tmp_path / "token.pem"))
        now = int(time.time())
        good = {
            "iss": ISSUER, "sub": "bob", "aud": "edgecache", "iat": now, "exp": now + 60,
            "authenticated": True,
            "access": [{"type": "repository", "name": "team/app", "actions": ["pull"]}],
        }  # fmt: skip
        signed = jwt.encode(good, key.private, key.algorithm, {"kid": key.kid})
        assert (await get(edge, APP, bearer(signed)))[0] == 200  # the forger's baseline is a good token
        forged = {
            "expired": jwt.encode(
                {**good, "iat": now - 900, "exp": now - 600}, key.private, key.algorithm, {"kid": key.kid}
            ),
            "other key": jwt.encode(good, ec.generate_private_key(ec.SECP256R1()), "ES256", {"kid": key.kid}),
            "alg none": jwt.encode(good, None, "none", {"kid": key.kid}),
        }
        refused_before = await edge.metric(
            "edgecache_access_credential_checks_total", kind="token", result="refused"
        )
        for what, bad in forged.items():
            status, headers, body = await get(edge, APP, bearer(bad))
            assert status == 401, what
            assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED", what
            assert challenge(headers)["scope"] == "repository:team/app:pull", what
        refused = await edge.metric(
            "edgecache_access_credential_checks_total", kind="token", result="refused"
        )
        assert refused == refused_before + len(forged)
        assert await edge.metric("edgecache_access_credential_checks_total", kind="token", result="ok") >= 5


async def test_tokens_from_ldap_logins_need_no_directory_and_keys_rotate_on_reload(
    tmp_path: Path, origin: Registry, seeded: Seeded, tmp_path_factory: pytest.TempPathFactory
) -> None:
    slapd: Slapd = start_slapd(tmp_path_factory.mktemp("slapd-token"))
    try:
        (tmp_path / "service-password").write_text(SERVICE_PASSWORD)
        ldap = f"""
[access.ldap]
url = "{slapd.tls_url}"
ca_file = "{slapd.ca.cert_path}"
bind_dn = "{SERVICE_DN}"
bind_password_file = "{tmp_path / "service-password"}"
base_dn = "ou=people,{SUFFIX}"
connect_timeout = 1
response_timeout = 1
"""
        toml = token_toml(tmp_path, mode='["htpasswd", "ldap"]', extra=ldap)
        async with running_edge(in_process_config(tmp_path, origin, toml)) as edge:
            token = await token_for(edge, "repository:team/app:pull", basic("carol", PEOPLE["carol"]))
            assert jwt.decode(token, options={"verify_signature": False})["groups"] == ["devs", "ops"]
            slapd.pause()  # the directory hangs: a token needs no login check (login_cache = 0 here)
            assert (await get(edge, APP, bearer(token)))[0] == 200
            assert (await get(edge, "/token?scope=repository:team/app:pull", basic("dave", PEOPLE["dave"])))[
                0
            ] == 503
            slapd.resume()
            # SIGHUP's reload with a new key: new tokens carry its kid; the old token still works.
            write_key(tmp_path / "token2.pem")
            edge.instance.apply(
                in_process_config(
                    tmp_path,
                    origin,
                    token_toml(tmp_path, mode='["htpasswd", "ldap"]', extra=ldap, key="token2.pem"),
                )
            )
            fresh = await token_for(edge, "repository:team/app:pull", basic("carol", PEOPLE["carol"]))
            assert jwt.get_unverified_header(fresh)["kid"] != jwt.get_unverified_header(token)["kid"]
            assert (await get(edge, APP, bearer(fresh)))[0] == 200
            assert (await get(edge, APP, bearer(token)))[0] == 200
    finally:
        slapd.stop()


@pytest.fixture
def tls_token_edge(tmp_path: Path, origin: Registry, seeded: Seeded) -> Iterator[tuple[str, TestCA, Path]]:
    ca = TestCA(tmp_path / "pki")
    server = ca.issue("edge")
    toml = f'[server]\ntls_cert = "{server.cert}"\ntls_key = "{server.key}"\n' + token_toml(tmp_path)
    with spawn_edge(tmp_path, origin.url, config=toml, tls=True) as edge:
        yield edge.url, ca, edge.log_path


@pytest.mark.clients
def test_skopeo_logs_in_through_the_token_flow(
    tls_token_edge: tuple[str, TestCA, Path], tmp_path: Path, seeded: Seeded
) -> None:
    url, ca, log_path = tls_token_edge
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    shutil.copy(ca.cert_path, cert_dir / "ca.crt")
    host = url.removeprefix("https://")
    creds = f"alice:{PASSWORDS['alice']}"
    copied = skopeo_copy_all(
        f"{host}/library/alpine:latest", tmp_path / "a", tls_verify=True, cert_dir=cert_dir, creds=creds
    )
    assert copied.digest == seeded.alpine.manifest.digest
    with pytest.raises(Exception, match=r"(?i)unauthorized|denied|authentication"):
        skopeo_copy_all(
            f"{host}/team/app:1.0", tmp_path / "b", tls_verify=True, cert_dir=cert_dir, creds=creds
        )
    records = access_records(log_path)
    tokens = [r for r in records if r.get("route") == "token"]
    pulls = [r for r in records if r.get("route") in ("manifest", "blob") and r["status"] == 200]
    assert tokens and all(r["identity"] == "alice" for r in tokens)
    assert pulls and all(r["identity"] == "alice" for r in pulls)
    text = log_path.read_text()
    assert PASSWORDS["alice"] not in text and "eyJ" not in text  # no password, no token in the log


@pytest.mark.clients
def test_podman_logs_in_and_pulls_through_the_token_flow(
    tls_token_edge: tuple[str, TestCA, Path], tmp_path: Path, seeded: Seeded
) -> None:
    """podman (vfs storage under the test's dir, its own auth file) logs in, pulls what alice may
    pull with the token /token gave it, and is refused what she may not."""
    url, ca, log_path = tls_token_edge
    cert_dir = tmp_path / "podman-certs"
    cert_dir.mkdir()
    shutil.copy(ca.cert_path, cert_dir / "ca.crt")
    host = url.removeprefix("https://")
    podman = require_binary("podman")
    runroot = Path(tempfile.mkdtemp(prefix="pm-", dir="/tmp"))  # podman wants it under 50 characters
    storage = ["--root", str(tmp_path / "podman-root"), "--runroot", str(runroot),
               "--storage-driver", "vfs"]  # fmt: skip
    auth = ["--authfile", str(tmp_path / "podman-auth.json"), "--cert-dir", str(cert_dir)]
    env = client_env(REGISTRIES_CONFIG_PATH=os.devnull, CONTAINERS_REGISTRIES_CONF=os.devnull)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [podman, *storage, *args], capture_output=True, text=True, timeout=180, env=env, check=False
        )

    login = subprocess.run(  # the password on stdin, never in argv
        [podman, *storage, "login", *auth, "-u", "alice", "--password-stdin", host],
        input=PASSWORDS["alice"], capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    try:
        assert login.returncode == 0 and "Login Succeeded" in login.stdout, login.stderr
        pulled = run("pull", *auth, f"{host}/library/alpine:latest")
        assert pulled.returncode == 0, pulled.stderr
        images = run("images", "--digests", "--format", "{{.Digest}}", f"{host}/library/alpine")
        assert seeded.alpine.manifest.digest in images.stdout
        refused = run("pull", *auth, f"{host}/team/app:1.0")
        assert refused.returncode != 0
        assert re.search(r"(?i)unauthorized|denied|authentication", refused.stderr)
    finally:
        shutil.rmtree(runroot, ignore_errors=True)
    tokens = [r for r in access_records(log_path) if r.get("route") == "token"]
    assert tokens and all(r["identity"] == "alice" for r in tokens)
    text = log_path.read_text()
    assert PASSWORDS["alice"] not in text and "eyJ" not in text


@pytest.mark.clients
def test_dockerd_logs_in_and_pulls_through_the_token_flow(
    tls_token_edge: tuple[str, TestCA, Path], seeded: Seeded
) -> None:
    require_root()
    require_clients()
    url, ca, log_path = tls_token_edge
    host = url.removeprefix("https://")
    certs_d = Path("/etc/docker/certs.d") / host
    certs_d.mkdir(parents=True, exist_ok=True)
    shutil.copy(ca.cert_path, certs_d / "ca.crt")
    try:
        with Dockerd(registry_mirrors=[]) as dockerd:
            login = dockerd.docker("login", host, "-u", "alice", "-p", PASSWORDS["alice"], timeout=60)
            assert "Login Succeeded" in login.stdout
            dockerd.pull(f"{host}/library/alpine:latest")
            assert dockerd.image_id(f"{host}/library/alpine:latest") == seeded.alpine.config.digest
            with pytest.raises(Exception, match=r"(?i)unauthorized|denied|authentication"):
                dockerd.pull(f"{host}/team/app:1.0")
    finally:
        shutil.rmtree(certs_d, ignore_errors=True)
    records = access_records(log_path)
    assert any(r.get("route") == "token" and r["identity"] == "alice" for r in records)
    pulls = [r for r in records if r.get("route") in ("manifest", "blob") and r["status"] == 200]
    assert pulls and all(r["identity"] == "alice" for r in pulls)
    assert PASSWORDS["alice"] not in log_path.read_text()


async def test_the_client_certificate_is_the_login_at_token_and_nothing_reaches_the_upstream(
    tmp_path: Path, origin: Registry, seeded: Seeded
) -> None:
    """On the mutual-TLS listener /token takes the certificate's subject as the login; neither the
    Basic credentials nor the tokens clients send ever reach the upstream (a recording proxy)."""
    recording = await FaultProxy(origin.url).start()
    try:
        ca = TestCA(tmp_path / "pki")
        server, puller = ca.issue("edge"), ca.issue("puller", client=True)
        write_key(tmp_path / "token.pem")
        config = f"""
[server]
tls_cert = "{server.cert}"
tls_key = "{server.key}"
[access]
mode = "mtls"
client_ca = "{ca.cert_path}"
token = true
token_key = "{tmp_path / "token.pem"}"
[[access.rules]]
identity = "CN=puller"
allow = ["docker.io/library/*"]
"""
        with spawn_edge(tmp_path, recording.url, config=config, tls=True) as edge:
            cert = (puller.cert, puller.key)

            def get_with_cert(path: str, *headers: str) -> tuple[int, bytes]:
                got = curl(
                    edge.url + path, cacert=ca.cert_path, cert=cert, headers=(MANIFEST_ACCEPT, *headers)
                )
                return got.status, got.body

            status, body = await asyncio.to_thread(
                get_with_cert, "/token?service=edgecache&scope=repository:library/alpine:pull"
            )
            assert status == 200
            token = json.loads(body)["token"]
            assert jwt.decode(token, options={"verify_signature": False})["sub"] == "CN=puller"
            status, body = await asyncio.to_thread(get_with_cert, ALPINE, f"Authorization: Bearer {token}")
            assert status == 200 and body == seeded.alpine.manifest.data
            text = edge.log_path.read_text()
            assert token not in text and token.split(".")[2] not in text
        assert recording.seen
        for seen in recording.seen:
            sent = json.dumps(seen.headers)
            assert "Bearer" not in sent and token.split(".")[2] not in sent
    finally:
        await recording.stop()
