"""Pure checks of the OCI vocabulary and the auth policy: no sockets, no disk."""

from __future__ import annotations

import pytest

from edgecache import errors
from edgecache.oci import (
    ByteRange,
    Digest,
    RepoName,
    Tag,
    accepted_media_types,
    manifest_media_type,
    parse_range,
)
from edgecache.upstream.tokens import (
    MAX_TOKEN_LIFETIME,
    TokenCache,
    parse_challenge,
    realm_allowed,
    token_from,
)


def test_digest_grammar() -> None:
    assert str(Digest.parse("sha256:" + "a" * 64)) == "sha256:" + "a" * 64
    assert Digest.parse("sha512:" + "b" * 128).algorithm == "sha512"
    for bad in ["sha256:" + "A" * 64, "sha256:" + "a" * 63, "sha1:" + "a" * 40, "sha256", "", "sha256:../x"]:
        with pytest.raises(errors.DigestInvalid):
            Digest.parse(bad)
    assert Digest.of(b"") == Digest.parse(
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


def test_names_and_tags() -> None:
    assert RepoName.parse("library/alpine").value == "library/alpine"
    assert RepoName.parse("a/b-c/d__e.f").with_library_prefix().value == "a/b-c/d__e.f"
    assert RepoName.parse("alpine").with_library_prefix().value == "library/alpine"
    for bad in ["Alpine", "a/", "/a", "a//b", "a/../b", "a/./b", "-a", "a" * 256, "a b", "a%2fb"]:
        with pytest.raises(errors.NameInvalid):
            RepoName.parse(bad)
    assert Tag.parse("v1.2_3-rc").value == "v1.2_3-rc"
    for bad in [".x", "-x", "a" * 129, "a/b", ""]:
        with pytest.raises(errors.TagInvalid):
            Tag.parse(bad)


def test_ranges() -> None:
    assert parse_range((), 10) is None
    assert parse_range(("bytes=0-4",), 10) == ByteRange(0, 4)
    assert parse_range(("bytes=5-",), 10) == ByteRange(5, 9)
    assert parse_range(("bytes=-3",), 10) == ByteRange(7, 9)
    assert parse_range(("bytes=-30",), 10) == ByteRange(0, 9)
    assert parse_range(("bytes=2-100",), 10) == ByteRange(2, 9)
    for ignored in ["items=0-1", "bytes=0-1,3-4"]:  # RFC 9110: other units, several ranges
        assert parse_range((ignored,), 10) is None
    for refused in [("bytes=5-2",), ("bytes=x-",), ("bytes=-",), ("bytes=0-1", "bytes=2-3")]:
        with pytest.raises(errors.RangeInvalid) as malformed:
            parse_range(refused, 10)
        assert malformed.value.size == 10  # the 416 can say how big the blob is
    for unsatisfiable in ["bytes=10-", "bytes=-0", "bytes=99-100"]:
        with pytest.raises(errors.RangeInvalid):
            parse_range((unsatisfiable,), 10)


def test_accept_sets() -> None:
    assert accepted_media_types([]) is None
    assert accepted_media_types(["*/*"]) is None
    assert accepted_media_types(["a/b, c/d;q=0.5", "E/F"]) == {"a/b", "c/d", "e/f"}


def test_manifest_media_type_prefers_the_declared_one() -> None:
    assert (
        manifest_media_type(b"{}", "application/vnd.oci.image.index.v1+json")
        == "application/vnd.oci.image.index.v1+json"
    )
    body = (
        b'{"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "config": {"mediaType": "x"}}'
    )
    assert (
        manifest_media_type(body, "application/octet-stream")
        == "application/vnd.docker.distribution.manifest.v2+json"
    )
    assert manifest_media_type(b'{"manifests": []}', None) == "application/vnd.oci.image.index.v1+json"
    assert manifest_media_type(
        body, "application/vnd.docker.distribution.manifest.v2+json; charset=utf-8"
    ) == ("application/vnd.docker.distribution.manifest.v2+json")


@pytest.mark.parametrize(
    ("body", "declared"),
    [
        # the Content-Type names one manifest type, the body another: refused, never cached
        (
            b'{"mediaType": "application/vnd.oci.image.index.v1+json"}',
            "application/vnd.oci.image.manifest.v1+json",
        ),
        (b'{"mediaType": "application/vnd.oci.image.manifest.v1+json"}', "text/html"),
        (b"<html>rate limited</html>", "application/vnd.oci.image.manifest.v1+json"),
        (b"[1, 2]", None),
        (b"", "application/vnd.oci.image.manifest.v1+json"),
        (b"[" * 100_000, None),
    ],
)
def test_manifest_that_contradicts_itself_or_is_not_json_is_invalid(
    body: bytes, declared: str | None
) -> None:
    with pytest.raises(errors.ManifestInvalid) as raised:
        manifest_media_type(body, declared)
    assert raised.value.status == 502 and raised.value.code == "MANIFEST_INVALID"


def test_challenges_and_where_credentials_may_go() -> None:
    challenge = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull"'
    )
    assert challenge is not None and challenge.scheme == "bearer"
    assert challenge.realm == "https://auth.docker.io/token"
    assert challenge.params["scope"] == "repository:library/alpine:pull"
    hub = "https://registry-1.docker.io"
    assert realm_allowed("https://auth.docker.io/token", hub)
    assert not realm_allowed("http://auth.docker.io/token", hub)  # downgrade
    assert not realm_allowed("https://evil.example/token", hub)
    assert not realm_allowed("https://127.0.0.1/token", hub)
    assert not realm_allowed("https://docker.io.evil.example/token", hub)
    assert realm_allowed("https://ghcr.io/token", "https://ghcr.io")
    assert realm_allowed("http://127.0.0.1:9/token", "http://127.0.0.1:5000")  # same host as configured
    assert not realm_allowed("http://127.0.0.1:9/token", "https://127.0.0.1:5000")


def test_token_cache_expires_before_the_token_does() -> None:
    now = [1000.0]
    cache = TokenCache(clock=lambda: now[0])
    cache.put("scope", "t", 60)
    assert cache.get("scope") == "t"
    now[0] += 49
    assert cache.get("scope") == "t"
    now[0] += 2  # within the safety margin of expiry
    assert cache.get("scope") is None


@pytest.mark.parametrize(
    ("doc", "lifetime"),
    [
        ({"token": "t", "expires_in": 300}, 300.0),
        ({"access_token": "t", "expires_in": 7.5}, 7.5),
        ({"token": "t", "expires_in": float("inf")}, MAX_TOKEN_LIFETIME),
        ({"token": "t", "expires_in": 10**400}, MAX_TOKEN_LIFETIME),
        ({"token": "t", "expires_in": float("nan")}, None),
        ({"token": "t", "expires_in": -1}, None),
        ({"token": "t", "expires_in": True}, None),
        ({"token": "t", "expires_in": "300"}, None),
        ({"token": "t"}, None),
    ],
)
def test_token_lifetimes_from_a_token_answer(doc: dict[str, object], lifetime: float | None) -> None:
    assert token_from(doc) == ("t", lifetime)


@pytest.mark.parametrize(
    "doc", [[], "t", {}, {"token": ""}, {"token": " "}, {"token": 5}, {"token": "a\r\nb"}, {"token": None}]
)
def test_token_answers_without_a_usable_token(doc: object) -> None:
    with pytest.raises(ValueError):
        token_from(doc)


def test_cached_tokens_never_outlive_the_lifetime_cap() -> None:
    now = [0.0]
    cache = TokenCache(clock=lambda: now[0])
    cache.put("scope", "t", 1e12)
    now[0] = MAX_TOKEN_LIFETIME
    assert cache.get("scope") is None


def test_routes_are_remembered_within_bounds_and_refusals_every_time() -> None:
    """parse_route remembers the paths clients repeat; what it refuses is refused again each time, and
    a long path (an upload's tail, a hostile reference) is matched without being kept."""
    from edgecache.http import routes

    path = "/v2/library/alpine/manifests/3.20"
    assert routes.parse_route(path) is routes.parse_route(path)
    for _ in range(2):
        with pytest.raises(errors.DigestInvalid):
            routes.parse_route("/v2/library/alpine/blobs/sha256:nothex")
    before = routes._remembered_route.cache_info().currsize
    long_path = "/v2/library/alpine/manifests/" + "t" * routes.REMEMBERED_PATH_LENGTH
    assert routes.parse_route(long_path).reference is None  # neither tag nor digest: a 404 later
    assert routes._remembered_route.cache_info().currsize == before
    assert routes._remembered_route.cache_info().maxsize == 4096
