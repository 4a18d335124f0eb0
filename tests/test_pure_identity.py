"""Identity decisions without sockets: group rules, login modes tried in order with the login cache
(a stand-in directory object, injected clock), scopes parsed at /token, and the token service's
signatures, expiry, audience, scopes and key rotation (PyJWT used directly to forge the bad ones)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from edgecache import errors
from edgecache.access import policy as policy_module
from edgecache.access.identity import Identity, applies
from edgecache.access.policy import AccessPolicy
from edgecache.access.tokens import ISSUER, MAX_SCOPES, Scope, TokenService, load_key, parse_scopes
from edgecache.config import AccessConfig, AccessRule, LdapConfig, load_config
from edgecache.errors import ConfigError
from edgecache.metrics import Metrics
from edgecache.oci import RepoName
from tests.support.clock import Clock
from tests.support.waiting import wait_until
from tests.test_pure_access import basic, write_htpasswd


def write_key(path: Path, kind: str = "ec") -> Path:
    key = ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else rsa.generate_private_key(65537, 2048)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


def test_rules_name_groups_and_a_group_never_matches_a_user_of_that_name() -> None:
    ops = AccessRule("group:ops", allow=("*",))
    assert applies(ops, Identity("carol", True, frozenset({"ops"})))
    assert not applies(ops, Identity("dave", True, frozenset({"devs"})))
    assert not applies(ops, Identity("ops", True))  # a user called ops is not the group
    assert not applies(ops, Identity("anonymous", False, frozenset({"ops"})))


class FakeDirectory:
    """Stands in for LdapDirectory in pure tests: answers from a dict, counts the checks, or fails."""

    def __init__(self, users: dict[str, tuple[str, frozenset[str]]]) -> None:
        self.users = users
        self.checks = 0
        self.down = False

    async def check(self, user: str, password: str) -> frozenset[str] | None:
        self.checks += 1
        if self.down:
            raise errors.DirectoryUnavailable()
        known = self.users.get(user)
        return known[1] if known and known[0] == password else None

    def close(self) -> None:
        pass


def ldap_policy(
    tmp_path: Path, clock: Clock, modes: str = "htpasswd,ldap"
) -> tuple[AccessPolicy, FakeDirectory]:
    config = AccessConfig(
        mode=modes,
        htpasswd=write_htpasswd(tmp_path / "htpasswd", {"alice": "alice-pass"}),
        ldap=LdapConfig(url="ldaps://127.0.0.1:1", base_dn="dc=x"),
        login_cache=30,
        max_failures=3,
        rules=(
            AccessRule("group:ops", allow=("docker.io/*",)),
            AccessRule("alice", allow=("docker.io/library/*",)),
        ),
    )
    policy = AccessPolicy(config, clock=clock)
    directory = FakeDirectory({"carol": ("carol-pass", frozenset({"ops"}))})
    policy._ldap = directory  # type: ignore[assignment]
    return policy, directory


async def test_modes_in_order_the_login_cache_and_a_directory_down(tmp_path: Path) -> None:
    clock = Clock()
    policy, directory = ldap_policy(tmp_path, clock)
    carol = await policy.authenticate(basic("carol", "carol-pass"), "10.0.0.1", None)
    assert carol == Identity("carol", True, frozenset({"ops"}))
    policy.check(carol, "docker.io", RepoName.parse("team/app"))
    assert (await policy.authenticate(basic("alice", "alice-pass"), "10.0.0.1", None)).name == "alice"
    assert directory.checks == 1  # alice was found in htpasswd first
    # Remembered: the directory is not asked again, even when it is down, until the entry expires.
    directory.down = True
    assert await policy.authenticate(basic("carol", "carol-pass"), "10.0.0.1", None) == carol
    assert directory.checks == 1
    with pytest.raises(errors.DirectoryUnavailable):  # not remembered: cannot tell, nobody let in
        await policy.authenticate(basic("carol", "other"), "10.0.0.1", None)
    clock.advance(31)
    with pytest.raises(errors.DirectoryUnavailable):
        await policy.authenticate(basic("carol", "carol-pass"), "10.0.0.1", None)
    # A directory that cannot answer is not a failed login: no 429 after many of them.
    directory.down = False
    for _ in range(3):
        with pytest.raises(errors.Unauthorized):
            await policy.authenticate(basic("carol", "wrong"), "10.0.0.2", None)
    with pytest.raises(errors.TooManyAttempts):
        await policy.authenticate(basic("carol", "carol-pass"), "10.0.0.2", None)
    assert (await policy.authenticate(basic("carol", "carol-pass"), "10.0.0.1", None)).name == "carol"


async def test_a_directory_down_does_not_stop_the_modes_after_it(tmp_path: Path) -> None:
    policy, directory = ldap_policy(tmp_path, Clock(), modes="ldap,htpasswd")
    directory.down = True
    assert (await policy.authenticate(basic("alice", "alice-pass"), "10.0.0.1", None)).name == "alice"
    with pytest.raises(errors.DirectoryUnavailable):  # htpasswd said no, the directory could not tell
        await policy.authenticate(basic("alice", "wrong"), "10.0.0.1", None)
    directory.down = False
    with pytest.raises(errors.Unauthorized):
        await policy.authenticate(basic("alice", "wrong"), "10.0.0.1", None)


def test_mode_lists_and_ldap_settings_are_validated(tmp_path: Path) -> None:
    def load(text: str) -> str:
        (tmp_path / "c.toml").write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_config(str(tmp_path / "c.toml"), env={})
        return str(caught.value)

    ldap = '[access.ldap]\nurl = "ldap://dir.example:389"\nbase_dn = "dc=example"\n'
    assert "clear" in load(f'[access]\nmode = "ldap"\n{ldap}')
    assert "anonymous cannot be combined" in load('[access]\nmode = ["anonymous", "ldap"]\n')
    assert "one or more of" in load('[access]\nmode = ["ldap", "kerberos"]\n')
    assert "start_tls" in load(
        f'[access]\nmode = "ldap"\n{ldap}start_tls = true\nurl = "ldaps://x"\n'.replace(
            'url = "ldap://dir.example:389"\n', ""
        )
    )
    assert "token_key" in load(f'[access]\nmode = "ldap"\ntoken = true\n{ldap}allow_plain = true\n')
    (tmp_path / "ok.toml").write_text(f'[access]\nmode = ["ldap"]\n{ldap}start_tls = true\n')
    config = load_config(str(tmp_path / "ok.toml"), env={})
    assert config.access.modes == ("ldap",) and config.access.ldap.start_tls


def test_a_token_request_for_too_many_scopes_is_refused() -> None:
    asked = [f"repository:team/app{i}:pull" for i in range(MAX_SCOPES)]
    assert len(parse_scopes([" ".join(asked)])) == MAX_SCOPES
    with pytest.raises(errors.ScopeInvalid):
        parse_scopes([*asked, "repository:one/more:pull"])


def test_scopes_are_parsed_and_only_repository_scopes_count() -> None:
    assert parse_scopes(["repository:library/alpine:pull", "repository:localhost:5000/a/b:pull,push"]) == [
        Scope("library/alpine", ("pull",)),
        Scope("localhost:5000/a/b", ("pull", "push")),
    ]
    assert parse_scopes(["registry:catalog:*", "repository::pull", "nonsense", ""]) == []
    assert parse_scopes(["repository:a:pull repository:b:pull"]) == [
        Scope("a", ("pull",)),
        Scope("b", ("pull",)),
    ]


def token_config(tmp_path: Path, kind: str = "ec", name: str = "key.pem") -> AccessConfig:
    return AccessConfig(
        mode="htpasswd", token=True, token_key=str(write_key(tmp_path / name, kind)), token_ttl=60
    )


def claims_of(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_tokens_grant_only_their_scopes_and_forgeries_are_refused(tmp_path: Path, kind: str) -> None:
    config = token_config(tmp_path, kind)
    service = TokenService(config)
    carol = Identity("carol", True, frozenset({"ops"}))
    token, expires_in, _ = service.issue(carol, ["team/app"])
    assert expires_in == 60
    claims = claims_of(token)
    assert claims["access"] == [{"type": "repository", "name": "team/app", "actions": ["pull"]}]
    assert claims["aud"] == "edgecache" and claims["iss"] == ISSUER
    assert jwt.get_unverified_header(token)["alg"] == ("ES256" if kind == "ec" else "RS256")
    assert service.verify(token) == Identity("carol", True, frozenset({"ops"}), frozenset({"team/app"}))

    key = load_key(config.token_key)
    now = int(time.time())
    good = {"iss": ISSUER, "sub": "carol", "aud": "edgecache", "iat": now, "exp": now + 60, "access": []}

    def forged(claims: dict[str, object], signer: object = key.private, alg: str = key.algorithm) -> str:
        return jwt.encode(claims, signer, algorithm=alg, headers={"kid": key.kid})  # type: ignore[arg-type]

    assert service.verify(forged(good)).name == "carol"  # the forger's baseline is a valid token
    other_key: object = (
        ec.generate_private_key(ec.SECP256R1())
        if kind == "ec"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    refused = {
        "expired": forged({**good, "iat": now - 600, "exp": now - 300}),
        "other audience": forged({**good, "aud": "another-service"}),
        "other issuer": forged({**good, "iss": "someone"}),
        "no expiry": forged({k: v for k, v in good.items() if k != "exp"}),
        # the same kind and algorithm as the service's key, so the signature check itself refuses it
        "another key": forged(good, signer=other_key),
        "alg none": jwt.encode(good, None, algorithm="none", headers={"kid": key.kid}),
        # HMAC keyed with the public key (the classic confusion attack)
        "hmac with the public key": _hmac_with_public_key(good, key.private.public_key(), key.kid),
        "unknown kid": jwt.encode(good, key.private, algorithm=key.algorithm, headers={"kid": "nope"}),
        "garbage": "not.a.token",
    }
    for what, bad in refused.items():
        try:
            service.verify(bad)
        except errors.Unauthorized:
            continue
        pytest.fail(f"a token with {what} was accepted")


def _hmac_with_public_key(claims: dict[str, object], public: object, kid: str) -> str:
    pem = public.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": kid}

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    import hashlib
    import hmac

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def test_a_rotated_key_still_verifies_until_its_tokens_expire(tmp_path: Path) -> None:
    clock = Clock(time.time())
    config = token_config(tmp_path)
    service = TokenService(config, clock=clock)
    old_token, _, _ = service.issue(Identity("carol", True), ["a"])
    rotated = dataclasses.replace(config, token_key=str(write_key(tmp_path / "new.pem")))
    service.reconfigure(rotated)
    new_token, _, _ = service.issue(Identity("carol", True), ["a"])
    assert claims_of(new_token)["jti"] != claims_of(old_token)["jti"]
    assert jwt.get_unverified_header(new_token)["kid"] != jwt.get_unverified_header(old_token)["kid"]
    assert service.verify(old_token).name == "carol"
    assert service.verify(new_token).name == "carol"
    clock.advance(config.token_ttl + 10)  # the old key's tokens have all expired: it is gone
    with pytest.raises(errors.Unauthorized):
        service.verify(old_token)


def test_a_reload_that_shortens_the_ttl_keeps_the_old_key_for_the_tokens_it_signed(tmp_path: Path) -> None:
    clock = Clock(time.time())
    config = token_config(tmp_path)
    service = TokenService(config, clock=clock)
    old_token, lifetime, _ = service.issue(Identity("carol", True), ["a"])
    shorter = dataclasses.replace(
        config, token_key=str(write_key(tmp_path / "new.pem")), token_ttl=config.token_ttl / 10
    )
    service.reconfigure(shorter)
    clock.advance(lifetime - 10)  # past the new TTL, within the old token's own lifetime
    assert service.verify(old_token).name == "carol"
    with pytest.raises(ConfigError):
        service.reconfigure(dataclasses.replace(config, token_key=str(tmp_path / "missing.pem")))


async def test_a_name_the_password_file_lacks_pays_its_check_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With htpasswd before ldap, a directory user's login is checked against the file as well (a
    dummy hash): were it skipped, names in the file would answer slower than others, and timing
    would tell which names it holds."""
    checked: list[bytes | None] = []
    real_check = policy_module._check

    def counting(password: bytes, hashed: bytes | None, unknown_cost: int) -> bool:
        checked.append(hashed)
        return real_check(password, hashed, unknown_cost)

    monkeypatch.setattr(policy_module, "_check", counting)
    policy, directory = ldap_policy(tmp_path, Clock())
    carol = await policy.authenticate(basic("carol", "carol-pass"), "10.0.0.1", None)
    assert carol.name == "carol" and directory.checks == 1
    assert checked == [None]  # the file was checked (dummy hash) before the directory said yes


async def test_a_verified_token_is_remembered_until_its_expiry_or_a_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client sends its token with every request, and a signature check costs several manifest
    hits: a token that passed is not checked again until it expires (at most a minute), and a reload
    forgets it. A refused token is checked every time."""
    clock, wall = Clock(), Clock(time.time())
    config = dataclasses.replace(token_config(tmp_path), htpasswd=write_htpasswd(tmp_path / "htpasswd", {}))
    metrics = Metrics(["docker.io"])
    policy = AccessPolicy(config, clock=clock, wall_clock=wall, metrics=metrics)
    assert policy.tokens is not None
    verified: list[str] = []
    real_verify = policy.tokens.verify

    def counting(token: str) -> Identity:
        verified.append(token)
        return real_verify(token)

    monkeypatch.setattr(policy.tokens, "verify", counting)
    token, _, _ = policy.tokens.issue(Identity("carol", True, frozenset({"ops"})), ["team/app"])
    carol = Identity("carol", True, frozenset({"ops"}), frozenset({"team/app"}))
    assert await policy.authenticate(f"Bearer {token}", "10.0.0.1", None) == carol
    assert await policy.authenticate(f"Bearer {token}", "10.0.0.2", None) == carol
    assert len(verified) == 1
    checks = "edgecache_access_credential_checks_total"
    assert metrics.registry.get_sample_value(checks, {"kind": "token", "result": "ok"}) == 1
    assert metrics.registry.get_sample_value(checks, {"kind": "token", "result": "remembered"}) == 1

    flipped = "A" if token[-10] != "A" else "B"
    forged = f"{token[:-10]}{flipped}{token[-9:]}"
    for _ in range(2):
        with pytest.raises(errors.Unauthorized):
            await policy.authenticate(f"Bearer {forged}", "10.0.0.1", None)
    assert len(verified) == 3

    wall.now = float(claims_of(token)["exp"])  # type: ignore[arg-type]
    assert await policy.authenticate(f"Bearer {token}", "10.0.0.1", None) == carol  # (real time: valid)
    assert len(verified) == 4  # its expiry came: checked again, not taken from memory
    wall.now = time.time()
    clock.advance(policy_module.REMEMBER_TOKENS_FOR + 1)
    await policy.authenticate(f"Bearer {token}", "10.0.0.1", None)
    assert len(verified) == 5
    policy.reconfigure(config)
    await policy.authenticate(f"Bearer {token}", "10.0.0.1", None)
    await policy.authenticate(f"Bearer {token}", "10.0.0.1", None)
    assert len(verified) == 6


async def test_a_check_still_running_at_a_reload_is_not_remembered_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token or password check that began under the old settings and ends after a reload is not
    remembered under the new ones (a user removed from the file, an audience changed): the next
    request is checked again."""
    config = dataclasses.replace(
        token_config(tmp_path), htpasswd=write_htpasswd(tmp_path / "htpasswd", {"alice": "alice-pass"})
    )
    policy = AccessPolicy(config)
    assert policy.tokens is not None
    token, _, _ = policy.tokens.issue(Identity("carol", True), ["team/app"])
    release = asyncio.Event()
    started: list[str] = []
    verify_ours, first_accepting = policy._verify_ours, policy._first_accepting

    async def held_token(token: str) -> Identity:
        started.append("token")
        await release.wait()
        return await verify_ours(token)

    async def held_password(user: str, password: str) -> Identity | None:
        started.append("password")
        await release.wait()
        return await first_accepting(user, password)

    monkeypatch.setattr(policy, "_verify_ours", held_token)
    monkeypatch.setattr(policy, "_first_accepting", held_password)
    checks = [
        asyncio.create_task(policy.authenticate(f"Bearer {token}", "10.0.0.1", None)),
        asyncio.create_task(policy.authenticate(basic("alice", "alice-pass"), "10.0.0.1", None)),
    ]
    await wait_until(lambda: len(started) == 2, message="the checks did not start")
    policy.reconfigure(config)
    release.set()
    assert [identity.name for identity in await asyncio.gather(*checks)] == ["carol", "alice"]
    await policy.authenticate(f"Bearer {token}", "10.0.0.1", None)
    await policy.authenticate(basic("alice", "alice-pass"), "10.0.0.1", None)
    assert sorted(started) == ["password", "password", "token", "token"]  # both checked again
