"""Configuration values as an operator writes them, in TOML or in EDGECACHE_* variables: what each
becomes, and which mistakes stop start-up with one line naming the key. Complements
test_config_cli.py (defaults, precedence, the CLI), which these do not repeat."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgecache.config import Config, load_config
from edgecache.errors import ConfigError
from edgecache.sizes import parse_size


def load(tmp_path: Path, toml: str = "", env: dict[str, str] | None = None) -> Config:
    path = tmp_path / "edgecache.toml"
    path.write_text(toml)
    return load_config(str(path), env=env or {}, cache_dir=str(tmp_path / "cache"))


def refused(tmp_path: Path, toml: str = "", env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, toml, env)
    message = str(raised.value)
    assert "\n" not in message  # one line for the operator
    return message


# -- sizes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "size"),
    [('"20G"', 20 * 1024**3), ('"500M"', 500 * 1024**2), ('"1.5T"', int(1.5 * 1024**4)),
     ('"20GiB"', 20 * 1024**3), ('"2g"', 2 * 1024**3), ("1048576", 1024**2), ('"0"', 0)],
)  # fmt: skip
def test_cache_sizes_in_units_or_plain_bytes(tmp_path: Path, written: str, size: int) -> None:
    config = load(tmp_path, f"[cache]\nmax_size = {written}\nmin_free = {written}\n")
    assert parse_size(config.cache.max_size, "cache.max_size") == size
    assert parse_size(config.cache.min_free, "cache.min_free") == size


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ('[cache]\nmax_size = "lots"\n', {}, "cache.max_size: expected a size such as 20G"),
        ("", {"EDGECACHE_CACHE_MIN_FREE": "10 apples"}, "cache.min_free: expected a size"),
        ('[cache]\nmax_size = "512K"\n', {}, "cache.max_size: at least 1M"),
        ("[cache]\nmax_size = 1.5\n", {}, "cache.max_size: expected a string"),
        ("[cache]\nmax_size = true\n", {}, "cache.max_size: expected a string"),
    ],
)
def test_wrong_sizes_name_the_key(tmp_path: Path, toml: str, env: dict[str, str], message: str) -> None:
    assert message in refused(tmp_path, toml, env)


# -- durations (seconds) and numbers ------------------------------------------------------------


def test_durations_are_seconds_from_integers_floats_or_text(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "[cache]\ntag_ttl = 30\nmax_stale = 0.5\n[server]\nheader_timeout = 2\n",
        {"EDGECACHE_CACHE_NEGATIVE_TTL": " 1.5 ", "EDGECACHE_UPSTREAM_DOWN_FOR": "12"},
    )
    assert config.cache.tag_ttl == 30.0 and isinstance(config.cache.tag_ttl, float)
    assert config.cache.max_stale == 0.5
    assert config.cache.negative_ttl == 1.5
    assert config.server.header_timeout == 2.0
    assert config.upstreams[0].down_for == 12.0


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ('[cache]\ntag_ttl = "30s"\n', {}, "cache.tag_ttl: expected a number, got '30s'"),  # no units
        ("", {"EDGECACHE_SERVER_IDLE_TIMEOUT": "1m"}, "server.idle_timeout: expected a number"),
        ("[cache]\ntag_ttl = true\n", {}, "cache.tag_ttl: expected a number, got True"),
        ("[server]\nheader_timeout = 0\n", {}, "server.header_timeout: must be > 0"),
        ("[cache]\nnegative_ttl = -1\n", {}, "cache.negative_ttl: must be >= 0"),
        ("[server]\nmax_connections = 1.0\n", {}, "server.max_connections: expected an integer, got 1.0"),
        ("[server]\nmax_connections = true\n", {}, "server.max_connections: expected an integer, got True"),
        ("", {"EDGECACHE_SERVER_MAX_CONNECTIONS": "1e3"}, "server.max_connections: expected an integer"),
        ("", {"EDGECACHE_ACCESS_MAX_FAILURES": "0"}, "access.max_failures >= 1"),
        ("[cache]\nlow_watermark = 0.95\nhigh_watermark = 0.9\n", {}, "cache.low_watermark/high_watermark"),
        ("[cache]\nhigh_watermark = 1.5\n", {}, "cache.low_watermark/high_watermark"),
        ('[[upstream]]\nname = ["docker.io"]\n', {}, "upstream[0].name: expected a string"),
        ('[[upstream]]\nname = "docker.io"\ndown_after = 0\n', {}, "down_after must be >= 1"),
    ],
)
def test_wrong_numbers_name_the_key(tmp_path: Path, toml: str, env: dict[str, str], message: str) -> None:
    assert message in refused(tmp_path, toml, env)


@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_a_ttl_that_is_not_a_finite_number_is_refused(tmp_path: Path, text: str) -> None:
    assert "cache.tag_ttl" in refused(tmp_path, env={"EDGECACHE_CACHE_TAG_TTL": text})


# -- booleans -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("TRUE", True), ("1", True), ("yes", True), (" Yes ", True),
     ("false", False), ("0", False), ("no", False)],
)  # fmt: skip
def test_booleans_from_the_environment(tmp_path: Path, text: str, value: bool) -> None:
    config = load(
        tmp_path, env={"EDGECACHE_UPSTREAM_PARENT": text, "EDGECACHE_UPSTREAM_LIBRARY_PREFIX": text}
    )
    assert config.upstreams[0].parent is value
    assert config.upstreams[0].library_prefix is value
    assert config.upstreams[0].adds_library_prefix is value  # set explicitly: beats the Docker Hub guess


def test_library_prefix_unset_is_guessed_from_the_upstream(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        '[[upstream]]\nname = "docker.io"\n[[upstream]]\nname = "ghcr.io"\nurl = "https://ghcr.io"\n'
        '[[upstream]]\nname = "hub.corp"\nurl = "https://registry-1.docker.io"\n',
    )
    assert [u.library_prefix for u in config.upstreams] == [None, None, None]
    assert [u.adds_library_prefix for u in config.upstreams] == [True, False, True]


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("", {"EDGECACHE_UPSTREAM_PARENT": "maybe"}, "upstream.parent: expected true or false, got 'maybe'"),
        ('[[upstream]]\nname = "docker.io"\nparent = 1\n', {}, "upstream[0].parent: expected true or false"),
        ('[[upstream]]\nname = "docker.io"\nlibrary_prefix = "on"\n', {}, "upstream[0].library_prefix"),
    ],
)
def test_wrong_booleans_name_the_key(tmp_path: Path, toml: str, env: dict[str, str], message: str) -> None:
    assert message in refused(tmp_path, toml, env)


# -- lists and TTL rules ------------------------------------------------------------------------


def test_lists_from_toml_arrays_or_comma_separated_text(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        '[server]\ntrusted_proxies = ["10.0.0.0/8", "192.168.1.1"]\n'
        '[[upstream]]\nname = "docker.io"\naliases = ["hub.corp", "docker.corp"]\n',
    )
    assert config.server.trusted_proxies == ("10.0.0.0/8", "192.168.1.1")
    assert config.upstreams[0].aliases == ("hub.corp", "docker.corp")
    from_env = load(
        tmp_path,
        env={"EDGECACHE_SERVER_TRUSTED_PROXIES": " 10.0.0.0/8, ,fd00::/8 ", "EDGECACHE_UPSTREAM_ALIASES": ""},
    )
    assert from_env.server.trusted_proxies == ("10.0.0.0/8", "fd00::/8")  # blanks dropped
    assert from_env.upstreams[0].aliases == ()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[server]\ntrusted_proxies = ["10.0.0.0/8", 5]\n',
            "server.trusted_proxies: expected a list of strings",
        ),
        ("[server]\ntrusted_proxies = 5\n", "server.trusted_proxies: expected a list of strings"),
        ('[server]\ntrusted_proxies = ["not-a-network"]\n', "server.trusted_proxies: 'not-a-network'"),
        (
            '[[access.rules]]\nidentity = "ci"\nallow = [1]\n',
            "access.rules[0].allow: expected a list of strings",
        ),
        ('[[access.rules]]\nidentity = ""\nallow = ["*"]\n', "access.rules[0].identity: must be set"),
        ('[[access.rules]]\nidentity = "ci"\nallw = ["*"]\n', "access.rules[0].allw: unknown key"),
        ('[access]\nrules = "everyone"\n', "access.rules: expected [[access.rules]] tables"),
        ("upstream = 5\n", "upstream: expected [[upstream]] tables"),
        ("default_upstream = 5\n", "default_upstream: expected a string"),
        ("server = 5\n", "server: expected a table [server]"),
    ],
)
def test_wrong_lists_and_tables_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    assert message in refused(tmp_path, toml)


def test_a_single_comma_separated_rule_list_is_one_glob_per_item(tmp_path: Path) -> None:
    config = load(
        tmp_path, '[[access.rules]]\nidentity = "anonymous"\nallow = "docker.io/*,ghcr.io/acme/*"\n'
    )
    assert config.access.rules[0].allow == ("docker.io/*", "ghcr.io/acme/*")


def test_a_rule_without_identity_names_the_key(tmp_path: Path) -> None:
    assert "access.rules[0].identity" in refused(tmp_path, '[[access.rules]]\nallow = ["*"]\n')


def test_tag_ttl_rules_from_a_table_or_text_first_match_wins(tmp_path: Path) -> None:
    config = load(
        tmp_path, '[[upstream]]\nname = "docker.io"\ntag_ttls = { "latest" = 30, "v*" = 86400, "*" = 5 }\n'
    )
    hub = config.upstreams[0]
    assert hub.tag_ttls == (("latest", 30.0), ("v*", 86400.0), ("*", 5.0))
    assert [hub.tag_ttl(t, 60.0) for t in ("latest", "v1.2", "edge")] == [30.0, 86400.0, 5.0]
    from_env = load(tmp_path, "", {"EDGECACHE_UPSTREAM_TAG_TTLS": "latest=30, v*=86400"}).upstreams[0]
    assert from_env.tag_ttls == (("latest", 30.0), ("v*", 86400.0))
    assert from_env.tag_ttl("edge", 60.0) == 60.0  # no rule matches: the cache-wide tag_ttl


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("", {"EDGECACHE_UPSTREAM_TAG_TTLS": "latest"}, "upstream.tag_ttls: expected pattern=seconds"),
        ("", {"EDGECACHE_UPSTREAM_TAG_TTLS": "latest=soon"}, "upstream.tag_ttls.latest: expected a number"),
        (
            '[[upstream]]\nname = "docker.io"\ntag_ttls = { latest = -1 }\n',
            {},
            "upstream[0].tag_ttls: TTLs must be >= 0",
        ),
        ('[[upstream]]\nname = "docker.io"\ntag_ttls = [30]\n', {}, "upstream[0].tag_ttls: expected a table"),
    ],
)
def test_wrong_tag_ttl_rules_name_the_key(
    tmp_path: Path, toml: str, env: dict[str, str], message: str
) -> None:
    assert message in refused(tmp_path, toml, env)


# -- the environment ----------------------------------------------------------------------------


def test_environment_names_outside_the_prefix_or_for_rules_are_ignored(tmp_path: Path) -> None:
    config = load(
        tmp_path, env={"EDGECACHE": "x", "OTHER_SERVER_LISTEN": "0.0.0.0:1", "EDGECACHE_ACCESS_RULES": "*"}
    )
    assert config.server.listen == "127.0.0.1:5000" and config.access.rules == ()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EDGECACHE_SERVER_LISTN": "0.0.0.0:1"}, "server.listn: unknown key (known keys: header_timeout"),
        ({"EDGECACHE_UPSTREAM_PASWORD_FILE": "/x"}, "EDGECACHE_UPSTREAM_PASWORD_FILE: unknown key"),
        ({"EDGECACHE_DEFAULT_UPSTREAM": "quay.io"}, "default_upstream: no upstream is named 'quay.io'"),
        (
            {"EDGECACHE_ACCESS_MODE": "kerberos"},
            "access.mode: one or more of",
        ),
    ],
)
def test_misspelt_environment_names_the_key(tmp_path: Path, env: dict[str, str], message: str) -> None:
    assert message in refused(tmp_path, env=env)


def test_environment_overrides_the_default_upstream_only(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        'default_upstream = "ghcr.io"\n[[upstream]]\nname = "docker.io"\n'
        '[[upstream]]\nname = "ghcr.io"\nurl = "https://ghcr.io"\n',
        {"EDGECACHE_UPSTREAM_STALL_TIMEOUT": "5"},
    )
    assert config.upstream("ghcr.io").stall_timeout == 5.0  # type: ignore[union-attr]
    assert config.upstream("docker.io").stall_timeout == 15.0  # type: ignore[union-attr]


def test_a_single_upstream_table_is_accepted_and_becomes_the_default(tmp_path: Path) -> None:
    config = load(tmp_path, '[upstream]\nname = "ghcr.io"\nurl = "https://ghcr.io"\n')
    assert config.default_upstream == "ghcr.io" and [u.name for u in config.upstreams] == ["ghcr.io"]
