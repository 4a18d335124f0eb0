"""Who may pull what, decided by AccessPolicy alone: identities from Authorization headers and client
certificates, per-repository rules, failed-login limits per client address, and the htpasswd file.
No server: the policy is called directly, bcrypt at its minimum cost (4) so each check is ~1 ms."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path

import bcrypt
import pytest

from edgecache import errors
from edgecache.access.policy import ANONYMOUS_IDENTITY, AccessPolicy, Identity, load_htpasswd
from edgecache.config import AccessConfig, AccessRule
from edgecache.errors import ConfigError
from edgecache.oci import RepoName
from tests.support.clock import Clock

PASSWORDS = {"alice": "alice-pass", "bob": "bob-pass"}
ALICE = Identity("alice", True)
BOB = Identity("bob", True)


def write_htpasswd(path: Path, passwords: dict[str, str]) -> str:
    lines = [
        f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}"
        for user, pw in passwords.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def repo(name: str) -> RepoName:
    return RepoName.parse(name)


def rule(identity: str, allow: tuple[str, ...] = (), deny: tuple[str, ...] = ()) -> AccessRule:
    return AccessRule(identity=identity, allow=allow, deny=deny)


def may_pull(policy: AccessPolicy, identity: Identity, target: str) -> bool:
    upstream, _, name = target.partition("/")
    try:
        policy.check(identity, upstream, repo(name))
    except (errors.AccessDenied, errors.Unauthorized):
        return False
    return True


@pytest.fixture
def htpasswd(tmp_path: Path) -> str:
    return write_htpasswd(tmp_path / "htpasswd", PASSWORDS)


def htpasswd_policy(
    htpasswd: str,
    *rules: AccessRule,
    max_failures: int = 10,
    login_cache: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
) -> AccessPolicy:
    config = AccessConfig(
        mode="htpasswd", htpasswd=htpasswd, rules=rules, max_failures=max_failures, login_cache=login_cache
    )
    return AccessPolicy(config, clock=clock)


@pytest.fixture
def clock() -> Clock:
    return Clock(5000.0)


# -- decisions over rules -----------------------------------------------------------------------


def test_without_rules_anonymous_mode_lets_anyone_pull_anything() -> None:
    policy = AccessPolicy(AccessConfig(mode="anonymous"))
    assert may_pull(policy, ANONYMOUS_IDENTITY, "docker.io/library/alpine")
    assert may_pull(policy, ANONYMOUS_IDENTITY, "ghcr.io/acme/secret-app")


def test_with_rules_nothing_is_served_that_no_rule_allows() -> None:
    policy = AccessPolicy(
        AccessConfig(mode="anonymous", rules=(rule("anonymous", allow=("docker.io/library/*",)),))
    )
    assert may_pull(policy, ANONYMOUS_IDENTITY, "docker.io/library/alpine")
    assert not may_pull(policy, ANONYMOUS_IDENTITY, "docker.io/bitnami/redis")
    assert not may_pull(policy, ANONYMOUS_IDENTITY, "ghcr.io/library/alpine")  # the upstream is part of it
    with pytest.raises(errors.AccessDenied) as raised:
        policy.check(ANONYMOUS_IDENTITY, "ghcr.io", repo("acme/app"))
    assert raised.value.status == 403 and "ghcr.io/acme/app" in str(raised.value)


def test_a_glob_star_spans_slashes_and_matching_is_case_sensitive() -> None:
    policy = AccessPolicy(
        AccessConfig(mode="anonymous", rules=(rule("anonymous", allow=("ghcr.io/acme/*",)),))
    )
    assert may_pull(policy, ANONYMOUS_IDENTITY, "ghcr.io/acme/team/deep/app")
    assert not may_pull(policy, ANONYMOUS_IDENTITY, "ghcr.io/acmecorp/app")
    policy = AccessPolicy(
        AccessConfig(mode="anonymous", rules=(rule("anonymous", allow=("ghcr.io/Acme/*",)),))
    )
    assert not may_pull(policy, ANONYMOUS_IDENTITY, "ghcr.io/acme/app")


@pytest.mark.parametrize("deny_first", [True, False])
def test_deny_wins_whatever_the_order_of_rules(htpasswd: str, deny_first: bool) -> None:
    """Not first-match: a deny in any rule that applies beats an allow in any other."""
    allow_all = rule("*", allow=("*",))
    deny_secret = rule("alice", deny=("ghcr.io/acme/secret-*",))
    rules = (deny_secret, allow_all) if deny_first else (allow_all, deny_secret)
    policy = htpasswd_policy(htpasswd, *rules)
    assert not may_pull(policy, ALICE, "ghcr.io/acme/secret-app")
    assert may_pull(policy, ALICE, "ghcr.io/acme/public-app")
    assert may_pull(policy, BOB, "ghcr.io/acme/secret-app")  # alice's deny is not bob's


def test_deny_inside_one_rule_beats_its_own_allow(htpasswd: str) -> None:
    policy = htpasswd_policy(
        htpasswd, rule("ci", allow=("*",), deny=("ghcr.io/acme/secret-*",)), rule("alice", allow=("*",))
    )
    ci = Identity("ci", True)
    assert not may_pull(policy, ci, "ghcr.io/acme/secret-x")
    assert may_pull(policy, ci, "docker.io/library/alpine")


def test_star_identity_is_anyone_authenticated_but_not_anonymous(htpasswd: str) -> None:
    policy = htpasswd_policy(htpasswd, rule("*", allow=("docker.io/*",)))
    assert may_pull(policy, ALICE, "docker.io/library/alpine")
    assert not may_pull(policy, ALICE, "ghcr.io/acme/app")
    assert not may_pull(policy, ANONYMOUS_IDENTITY, "docker.io/library/alpine")


def test_rules_for_other_identities_do_not_apply(htpasswd: str) -> None:
    policy = htpasswd_policy(htpasswd, rule("bob", allow=("*",)))
    assert may_pull(policy, BOB, "ghcr.io/acme/app")
    with pytest.raises(errors.AccessDenied):
        policy.check(ALICE, "ghcr.io", repo("acme/app"))


def test_htpasswd_mode_without_rules_lets_users_pull_and_asks_anonymous_to_log_in(htpasswd: str) -> None:
    policy = htpasswd_policy(htpasswd)
    assert may_pull(policy, ALICE, "ghcr.io/anything/at/all")
    with pytest.raises(errors.Unauthorized) as raised:
        policy.check(ANONYMOUS_IDENTITY, "docker.io", repo("library/alpine"))
    assert raised.value.status == 401  # a challenge: dockerd then sends its credentials


def test_htpasswd_mode_serves_anonymous_what_an_anonymous_rule_allows(htpasswd: str) -> None:
    policy = htpasswd_policy(htpasswd, rule("anonymous", allow=("docker.io/library/*",)))
    assert may_pull(policy, ANONYMOUS_IDENTITY, "docker.io/library/alpine")
    with pytest.raises(errors.Unauthorized):  # not 403: a login might allow it
        policy.check(ANONYMOUS_IDENTITY, "ghcr.io", repo("acme/app"))
    # A user is not anonymous: the anonymous rule does not reach them, and there is no other.
    with pytest.raises(errors.AccessDenied):
        policy.check(ALICE, "docker.io", repo("library/alpine"))


def test_mtls_without_a_certificate_is_denied_not_challenged() -> None:
    policy = AccessPolicy(AccessConfig(mode="mtls", rules=(rule("CN=ci,O=acme", allow=("*",)),)))
    assert may_pull(policy, Identity("CN=ci,O=acme", True), "ghcr.io/acme/app")
    with pytest.raises(errors.AccessDenied):  # a Basic challenge would not help
        policy.check(ANONYMOUS_IDENTITY, "ghcr.io", repo("acme/app"))
    policy.check_base(ANONYMOUS_IDENTITY)


def test_base_route_challenges_anonymous_only_in_htpasswd_mode(htpasswd: str) -> None:
    with pytest.raises(errors.Unauthorized):
        htpasswd_policy(htpasswd).check_base(ANONYMOUS_IDENTITY)
    htpasswd_policy(htpasswd).check_base(ALICE)
    AccessPolicy(AccessConfig(mode="anonymous")).check_base(ANONYMOUS_IDENTITY)


# -- identities ---------------------------------------------------------------------------------


async def test_identities_from_headers_and_certificates(htpasswd: str) -> None:
    policy = htpasswd_policy(htpasswd)
    assert await policy.authenticate(basic("alice", "alice-pass"), "10.0.0.1", None) == ALICE
    assert await policy.authenticate(None, "10.0.0.1", None) == ANONYMOUS_IDENTITY
    # dockerd may send a bearer token from elsewhere: treated as no credentials, not as wrong ones.
    assert await policy.authenticate("Bearer abc.def", "10.0.0.1", None) == ANONYMOUS_IDENTITY
    anonymous = AccessPolicy(AccessConfig(mode="anonymous"))
    assert await anonymous.authenticate(basic("alice", "alice-pass"), "10.0.0.1", None) == ANONYMOUS_IDENTITY
    mtls = AccessPolicy(AccessConfig(mode="mtls"))
    assert await mtls.authenticate(None, "10.0.0.1", "CN=ci,O=acme") == Identity("CN=ci,O=acme", True)
    assert await mtls.authenticate(basic("alice", "alice-pass"), "10.0.0.1", None) == ANONYMOUS_IDENTITY


@pytest.mark.parametrize(
    "header",
    [
        basic("alice", "wrong"),
        basic("nobody", "alice-pass"),
        "Basic !!!not-base64",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Basic " + base64.b64encode(b":password-without-user").decode(),
        "basic " + base64.b64encode(b"alice:" + b"x" * 1100).decode(),
    ],
)
async def test_wrong_or_malformed_credentials_are_refused(htpasswd: str, header: str) -> None:
    policy = htpasswd_policy(htpasswd)
    with pytest.raises(errors.Unauthorized) as raised:
        await policy.authenticate(header, "10.0.0.1", None)
    assert raised.value.status == 401
    assert "alice-pass" not in str(raised.value)


async def test_failures_are_limited_per_client_address_for_a_minute(htpasswd: str, clock: Clock) -> None:
    policy = htpasswd_policy(htpasswd, max_failures=3, login_cache=0, clock=clock)
    for _ in range(3):
        with pytest.raises(errors.Unauthorized):
            await policy.authenticate(basic("bob", "wrong"), "10.0.0.1", None)
        clock.now += 10
    # At t+30: the fourth attempt is refused without a check, even with the right password.
    with pytest.raises(errors.TooManyAttempts) as raised:
        await policy.authenticate(basic("bob", "bob-pass"), "10.0.0.1", None)
    assert raised.value.status == 429
    assert raised.value.retry_after == pytest.approx(30.0)  # when the oldest failure leaves the window
    # Another address is not affected.
    assert await policy.authenticate(basic("bob", "bob-pass"), "10.0.0.2", None) == BOB
    # The window slides: at t+60 the first failure has left it, so one attempt is allowed again.
    clock.now += 30
    assert await policy.authenticate(basic("bob", "bob-pass"), "10.0.0.1", None) == BOB


async def test_a_remembered_login_is_not_blocked_by_the_addresss_failures(
    htpasswd: str, clock: Clock
) -> None:
    policy = htpasswd_policy(htpasswd, max_failures=1, login_cache=30, clock=clock)
    assert await policy.authenticate(basic("alice", "alice-pass"), "10.0.0.1", None) == ALICE
    with pytest.raises(errors.Unauthorized):
        await policy.authenticate(basic("mallory", "guess"), "10.0.0.1", None)
    with pytest.raises(errors.TooManyAttempts):
        await policy.authenticate(basic("bob", "bob-pass"), "10.0.0.1", None)
    assert await policy.authenticate(basic("alice", "alice-pass"), "10.0.0.1", None) == ALICE
    # Once login_cache (30 s) has passed, alice's login is checked again, and so meets the address's
    # limit (mallory's failure is still within the failure window).
    clock.now += 31
    with pytest.raises(errors.TooManyAttempts):
        await policy.authenticate(basic("alice", "alice-pass"), "10.0.0.1", None)


async def test_reconfigure_rereads_htpasswd_and_forgets_remembered_logins(tmp_path: Path) -> None:
    path = write_htpasswd(tmp_path / "htpasswd", PASSWORDS)
    policy = htpasswd_policy(path, login_cache=3600)
    assert await policy.authenticate(basic("alice", "alice-pass"), "10.0.0.1", None) == ALICE
    assert may_pull(policy, ALICE, "ghcr.io/acme/app")  # (verdicts are kept until a reload)
    write_htpasswd(tmp_path / "htpasswd", {"alice": "new-pass"})
    policy.reconfigure(
        AccessConfig(mode="htpasswd", htpasswd=path, rules=(rule("alice", allow=("docker.io/*",)),))
    )
    with pytest.raises(errors.Unauthorized):  # the old password is no longer remembered
        await policy.authenticate(basic("alice", "alice-pass"), "10.0.0.1", None)
    with pytest.raises(errors.Unauthorized):  # bob was removed from the file
        await policy.authenticate(basic("bob", "bob-pass"), "10.0.0.1", None)
    assert await policy.authenticate(basic("alice", "new-pass"), "10.0.0.1", None) == ALICE
    assert not may_pull(policy, ALICE, "ghcr.io/acme/app")  # the new rules apply


# -- the htpasswd file --------------------------------------------------------------------------


def test_htpasswd_reads_bcrypt_entries_and_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    apache_style = "$2y$" + hashed[4:]  # what `htpasswd -B` writes
    path = tmp_path / "htpasswd"
    path.write_text(f"# users\n\nalice:{hashed}\n  bob:{apache_style}  \n")
    users = load_htpasswd(str(path))
    assert set(users) == {"alice", "bob"}
    assert bcrypt.checkpw(b"pw", users["bob"])


async def test_an_apache_2y_hash_logs_in(tmp_path: Path) -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    path = tmp_path / "htpasswd"
    path.write_text(f"carol:$2y${hashed[4:]}\n")
    policy = htpasswd_policy(str(path))
    assert await policy.authenticate(basic("carol", "pw"), "10.0.0.1", None) == Identity("carol", True)


@pytest.mark.parametrize(
    "line",
    [
        "alice:$apr1$abcdefgh$0123456789abcdefghijkl",  # htpasswd's default MD5
        "alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",
        "alice:plaintext",
        "alice",
        ":$2b$04$abcdefghijklmnopqrstuv",
    ],
)
def test_htpasswd_refuses_other_hash_kinds_naming_the_line(tmp_path: Path, line: str) -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    path = tmp_path / "htpasswd"
    path.write_text(f"# header\nbob:{hashed}\n{line}\n")
    with pytest.raises(
        ConfigError, match=r"access\.htpasswd: .* line 3: expected user:bcrypt-hash"
    ) as raised:
        load_htpasswd(str(path))
    assert "pw" not in str(raised.value).replace(str(path), "")


def test_missing_htpasswd_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"access\.htpasswd: cannot read .*missing"):
        load_htpasswd(str(tmp_path / "missing"))
