"""The pull checks of the OCI distribution-spec conformance suite, through edgecache in front of the
real origin registry, on both fronts (plain aiohttp, granian TLS).

Ported from opencontainers/distribution-spec conformance/01_pull_test.go, 06_tags_list_test.go and
07_error_codes_test.go (references and names as in its setup.go: `.INVALID_MANIFEST_NAME`,
`sha256:totallywrong`, the digest of "hello world", tags test0..test3, tag `tagtest0`). Each check
is named after its `g.Specify(...)` text and runs twice on a fresh edgecache: cold (the first request
through an empty cache) and warm (the same again, answered from what the first pass left).

Left out: the suite's Setup (it pushes; here the fixture pushes to the origin instead) and its
Teardown and push, delete and content-management workflows: the mirror is read-only and answers
them 405 UNSUPPORTED, which those checks accept. After the suite's checks come the spec rules the
suite does not test but the issue asks for (n=0, `last` exclusive, the Link walk, names with
control characters, digests edgecache cannot verify).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from tests.conftest import Edge, edge_config, running_edge, tls_edge_in_process
from tests.support.images import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, Blob, Pusher, tar_gz_layer
from tests.support.registry import Registry

# conformance/setup.go
NONEXISTENT_MANIFEST = ".INVALID_MANIFEST_NAME"
DUMMY_DIGEST = "sha256:" + hashlib.sha256(b"hello world").hexdigest()
TEST_TAG_NAME = "tagtest0"
ERROR_CODES = {
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "MANIFEST_UNVERIFIED",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "TAG_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
}
PULL_REPO = "conformance/pull"
TAGS_REPO = "conformance/tags"  # test0..test3, as the suite's tag list
MANY_REPO = "conformance/many"  # tags whose lexical order is not the upstream's listing order
MANY_TAGS = ["latest", "1.0", "test3", "test0", "Zed", "10", "2", "a_b", "A", "v1.10", "v1.9"]
PHASES = ("cold", "warm")


# -- the content the suite's Setup pushes, pushed to the origin ------------------------------------


@dataclass(frozen=True)
class Suite:
    configs: list[Blob]
    layer: Blob
    manifests: list[Blob]


def suite_manifest(config: Blob, layer: Blob) -> Blob:
    """An OCI image manifest as setup.go builds them (one config, one gzip'd tar layer), tab-indented
    like Go's MarshalIndent: the mirror must keep these exact bytes."""
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor()],
    }
    return Blob(json.dumps(doc, indent="\t").encode(), OCI_MANIFEST)


@pytest.fixture(scope="module")
def suite(origin: Registry) -> Suite:
    """setup.go's content for the pull and tags-list workflows: three configs (one per workflow,
    told apart by their author), one layer, and a manifest for each config. manifests[0] is tagged
    tagtest0 and manifests[1] pushed by digest only (01_pull); manifests[2] carries the tags
    test0..test3 (06_tags_list) and, in a third repository, tags in no particular order."""
    layer_data, _ = tar_gz_layer({"test.txt": b"you bothered to find out what was in here.\n"})
    layer = Blob(layer_data, OCI_LAYER)
    configs = []
    for author in ("conformance-pull", "conformance-push", "conformance-discovery"):
        doc = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
        configs.append(Blob(json.dumps({**doc, "author": author}, indent="\t").encode(), OCI_CONFIG))
    manifests = [suite_manifest(config, layer) for config in configs]
    pusher = Pusher(origin.url)
    for blob in (*configs, layer):
        for repo in (PULL_REPO, TAGS_REPO, MANY_REPO):
            pusher.push_blob(repo, blob)
    pusher.push_manifest(PULL_REPO, TEST_TAG_NAME, manifests[0])
    pusher.push_manifest(PULL_REPO, manifests[1].digest, manifests[1])
    for tag in ("test0", "test1", "test2", "test3"):
        pusher.push_manifest(TAGS_REPO, tag, manifests[2])
    for tag in MANY_TAGS:
        pusher.push_manifest(MANY_REPO, tag, manifests[2])
    return Suite(configs, layer, manifests)


@pytest.fixture(params=["plain-aiohttp", "tls-granian"])
async def edge(
    request: pytest.FixtureRequest, tmp_path: Path, origin: Registry, suite: Suite
) -> AsyncIterator[Edge]:
    """A fresh edgecache (empty cache) per check, on each front."""
    config = edge_config(tmp_path / "cache", origin.url)
    if request.param == "tls-granian":
        async with tls_edge_in_process(config, tmp_path / "pki") as running:
            yield running
        return
    async with running_edge(config) as running:
        yield running


# -- the client side of a check -------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    headers: CIMultiDict[str]  # granian sends names in lower case
    body: bytes

    def tags(self) -> list[str]:
        """getTagList: the `tags` of a tag list body."""
        return list(json.loads(self.body)["tags"])

    def error_code(self) -> str:
        """resp.Errors()[0].Code: the first error of an OCI error body."""
        assert self.headers.get("Content-Type", "").startswith("application/json"), self
        errors = json.loads(self.body)["errors"]
        assert errors and set(errors[0]) >= {"code", "message"}, errors
        return str(errors[0]["code"])


@dataclass
class Check:
    """One check's view of the world: the edgecache to ask, the origin behind it, the content."""

    edge: Edge
    origin: Registry
    suite: Suite
    phase: str

    async def request(
        self,
        method: str,
        path: str,
        *,
        accept: str | None = None,
        body: bytes | None = None,
        params: dict[str, str] | None = None,
    ) -> Answer:
        """`path` with `<name>` for the pull repository, sent exactly as written (no normalisation)."""
        url = URL(self.edge.url + path.replace("<name>", PULL_REPO), encoded=True)
        if params:
            url = url.update_query(params)
        headers = {"Accept": accept} if accept else {}
        if body is not None:
            headers["Content-Type"] = OCI_MANIFEST
        async with self.edge.http.request(method, url, headers=headers, data=body) as resp:
            return Answer(resp.status, CIMultiDict(resp.headers), await resp.read())

    async def upstream_untouched(self, send: Callable[[], Awaitable[Answer]]) -> Answer:
        """Send a request and show it reached no upstream (the origin served nothing for it)."""
        seen = len(self.origin.access_log())
        answer = await send()
        assert len(self.origin.access_log()) == seen, self.origin.access_log()[seen:]
        return answer

    def warm_hit(self, answer: Answer) -> None:
        """On the second pass, content the first pass fetched is served from the cache."""
        if self.phase == "warm":
            assert answer.headers.get("X-Cache") == "HIT", answer.headers


CheckFn = Callable[[Check], Awaitable[None]]
CHECKS: list[tuple[str, CheckFn]] = []


def specify(text: str) -> Callable[[CheckFn], CheckFn]:
    """Register a check under the suite's `g.Specify` text (prefixed with its file and context)."""

    def register(fn: CheckFn) -> CheckFn:
        CHECKS.append((text, fn))
        return fn

    return register


# -- 01_pull_test.go --------------------------------------------------------------------------------


@specify("01 Pull Setup: Get the name of a tag")
async def get_tag_name(check: Check) -> None:
    answer = await check.request("GET", "/v2/<name>/tags/list")
    assert answer.status == 200
    assert answer.tags()[0] == TEST_TAG_NAME  # getTagNameFromResponse


@specify("01 Pull blobs: HEAD request to nonexistent blob should result in 404 response")
async def head_nonexistent_blob(check: Check) -> None:
    answer = await check.request("HEAD", f"/v2/<name>/blobs/{DUMMY_DIGEST}")
    assert answer.status == 404


@specify("01 Pull blobs: HEAD request to existing blob should yield 200")
async def head_existing_blob(check: Check) -> None:
    config = check.suite.configs[0]
    answer = await check.request("HEAD", f"/v2/<name>/blobs/{config.digest}")
    assert answer.status == 200
    assert answer.headers.get("Docker-Content-Digest", config.digest) == config.digest


@specify("01 Pull blobs: GET nonexistent blob should result in 404 response")
async def get_nonexistent_blob(check: Check) -> None:
    answer = await check.request("GET", f"/v2/<name>/blobs/{DUMMY_DIGEST}")
    assert answer.status == 404


@specify("01 Pull blobs: GET request to existing blob URL should yield 200")
async def get_existing_blob(check: Check) -> None:
    config = check.suite.configs[0]
    answer = await check.request("GET", f"/v2/<name>/blobs/{config.digest}")
    assert answer.status == 200
    assert answer.body == config.data
    check.warm_hit(answer)


@specify("01 Pull manifests: HEAD request to nonexistent manifest should return 404")
async def head_nonexistent_manifest(check: Check) -> None:
    answer = await check.upstream_untouched(
        lambda: check.request("HEAD", f"/v2/<name>/manifests/{NONEXISTENT_MANIFEST}")
    )
    assert answer.status == 404


async def head_manifest_digest(check: Check, index: int) -> None:
    manifest = check.suite.manifests[index]
    answer = await check.request("HEAD", f"/v2/<name>/manifests/{manifest.digest}", accept=OCI_MANIFEST)
    assert answer.status == 200
    assert answer.headers.get("Docker-Content-Digest", manifest.digest) == manifest.digest
    check.warm_hit(answer)


@specify("01 Pull manifests: HEAD request to manifest[0] path (digest) should yield 200 response")
async def head_manifest0_digest(check: Check) -> None:
    await head_manifest_digest(check, 0)


@specify("01 Pull manifests: HEAD request to manifest[1] path (digest) should yield 200 response")
async def head_manifest1_digest(check: Check) -> None:
    await head_manifest_digest(check, 1)


@specify("01 Pull manifests: HEAD request to manifest path (tag) should yield 200 response")
async def head_manifest_tag(check: Check) -> None:
    manifest = check.suite.manifests[0]
    answer = await check.request("HEAD", f"/v2/<name>/manifests/{TEST_TAG_NAME}", accept=OCI_MANIFEST)
    assert answer.status == 200
    assert answer.headers.get("Docker-Content-Digest", manifest.digest) == manifest.digest
    check.warm_hit(answer)


@specify("01 Pull manifests: GET nonexistent manifest should return 404")
async def get_nonexistent_manifest(check: Check) -> None:
    answer = await check.upstream_untouched(
        lambda: check.request("GET", f"/v2/<name>/manifests/{NONEXISTENT_MANIFEST}")
    )
    assert answer.status == 404
    assert answer.error_code() == "MANIFEST_UNKNOWN"


async def get_manifest_digest(check: Check, index: int) -> None:
    manifest = check.suite.manifests[index]
    answer = await check.request("GET", f"/v2/<name>/manifests/{manifest.digest}", accept=OCI_MANIFEST)
    assert answer.status == 200
    assert answer.body == manifest.data
    check.warm_hit(answer)


@specify("01 Pull manifests: GET request to manifest[0] path (digest) should yield 200 response")
async def get_manifest0_digest(check: Check) -> None:
    await get_manifest_digest(check, 0)


@specify("01 Pull manifests: GET request to manifest[1] path (digest) should yield 200 response")
async def get_manifest1_digest(check: Check) -> None:
    await get_manifest_digest(check, 1)


@specify("01 Pull manifests: GET request to manifest path (tag) should yield 200 response")
async def get_manifest_tag(check: Check) -> None:
    answer = await check.request("GET", f"/v2/<name>/manifests/{TEST_TAG_NAME}", accept=OCI_MANIFEST)
    assert answer.status == 200
    assert answer.body == check.suite.manifests[0].data
    check.warm_hit(answer)


@specify("01 Error codes: 400 response body should contain OCI-conforming JSON message")
async def pull_error_codes(check: Check) -> None:
    answer = await check.upstream_untouched(
        lambda: check.request("GET", "/v2/<name>/manifests/sha256:totallywrong", body=b"blablabla")
    )
    assert answer.status in (400, 404)
    if answer.status == 400:
        assert answer.error_code() in ERROR_CODES


# -- 06_tags_list_test.go (the suite lists the tags of a repository holding test0..test3) -----------


async def list_tags(check: Check, repo: str = TAGS_REPO, **params: str) -> Answer:
    answer = await check.request("GET", f"/v2/{repo}/tags/list", params=params)
    assert answer.status == 200, answer
    return answer


@specify("06 Tags List: GET request to list tags should yield 200 response")
async def tags_list(check: Check) -> None:
    answer = await list_tags(check)
    assert answer.tags() == ["test0", "test1", "test2", "test3"]
    assert json.loads(answer.body)["name"] == TAGS_REPO


@specify("06 Tags List: GET request to manifest URL (tag) should yield 200 response")
async def tags_list_first_tag(check: Check) -> None:
    first = (await list_tags(check)).tags()[0]
    answer = await check.request("GET", f"/v2/{TAGS_REPO}/manifests/{first}", accept=OCI_MANIFEST)
    assert answer.status == 200
    check.warm_hit(answer)


@specify("06 Tags List: GET number of tags should be limitable by `n` query parameter")
async def tags_list_n(check: Check) -> None:
    num_tags = len((await list_tags(check)).tags())
    answer = await list_tags(check, n=str(num_tags // 2))
    assert len(answer.tags()) == num_tags // 2


@specify("06 Tags List: GET start of tag is set by `last` query parameter")
async def tags_list_last(check: Check) -> None:
    num_results = len((await list_tags(check)).tags()) // 2
    last_tag_list = (await list_tags(check, n=str(num_results))).tags()
    answer = await list_tags(check, n=str(num_results), last=last_tag_list[num_results - 1])
    assert "test3" in answer.tags()


# -- 07_error_codes_test.go -------------------------------------------------------------------------


@specify("07 Error codes: 400 response body should contain OCI-conforming JSON message")
async def put_error_codes(check: Check) -> None:
    answer = await check.upstream_untouched(
        lambda: check.request("PUT", "/v2/<name>/manifests/sha256:totallywrong", body=b"blablabla")
    )
    assert answer.status == 400
    assert answer.error_code() in ERROR_CODES


@specify("07 Error codes: Response from DELETE request to manifest URL (tag) should have OCI-conforming code")
async def delete_error_code(check: Check) -> None:
    first_tag = (await list_tags(check)).tags()[0]
    answer = await check.upstream_untouched(
        lambda: check.request("DELETE", f"/v2/{TAGS_REPO}/manifests/{first_tag}")
    )
    assert answer.error_code() in ERROR_CODES


# -- what the spec says beyond the suite's checks -------------------------------------------------

LEXICAL = sorted(MANY_TAGS)  # Python orders str by code point: byte order for ASCII tags


@specify("spec: tags are listed in lexical order whatever order the upstream lists them in")
async def tags_sorted(check: Check) -> None:
    async with (
        aiohttp.ClientSession() as direct,
        direct.get(f"{check.origin.url}/v2/{MANY_REPO}/tags/list") as resp,
    ):
        upstream = json.loads(await resp.read())["tags"]
    assert sorted(upstream) == LEXICAL and upstream != LEXICAL  # the origin lists them unsorted
    answer = await list_tags(check, MANY_REPO)
    assert answer.tags() == LEXICAL
    assert "Link" not in answer.headers


@specify("spec: `last` is exclusive, and applies without `n`")
async def tags_last_exclusive(check: Check) -> None:
    answer = await list_tags(check, MANY_REPO, last="1.0")
    assert answer.tags() == LEXICAL[1:]
    assert "Link" not in answer.headers


@specify("spec: when `n` is zero the list is empty and there is no Link header")
async def tags_n_zero(check: Check) -> None:
    answer = await list_tags(check, MANY_REPO, n="0")
    assert answer.tags() == []
    assert "Link" not in answer.headers


@specify("spec: following the Link header pages through every tag once, in order")
async def tags_link_walk(check: Check) -> None:
    seen: list[str] = []
    path = f"/v2/{MANY_REPO}/tags/list?n=4"
    while True:
        answer = await check.request("GET", path)
        assert answer.status == 200
        page = answer.tags()
        assert len(page) <= 4
        seen += page
        link = answer.headers.get("Link")
        if link is None:
            break
        match = re.fullmatch(r'<(/v2/[^>]+)>; rel="next"', link)
        assert match, link
        path = match[1]
        assert path == f"/v2/{MANY_REPO}/tags/list?last={page[-1]}&n=4"
    assert seen == LEXICAL


@specify("spec: a bad `n` is 400 PAGINATION_NUMBER_INVALID")
async def tags_bad_n(check: Check) -> None:
    for bad in ("-1", "abc", "1.5", "²", "9999999"):
        answer = await check.upstream_untouched(
            lambda bad=bad: check.request("GET", f"/v2/{MANY_REPO}/tags/list", params={"n": bad})
        )
        assert answer.status == 400, bad
        assert answer.error_code() == "PAGINATION_NUMBER_INVALID"


@specify("spec: a name with CR, LF or NUL is 400 NAME_INVALID")
async def names_with_control_characters(check: Check) -> None:
    for name in (
        "conformance/pu%0dll",
        "conformance/pu%0all",
        "conformance/pu%00ll",
        "conformance%0d%0a/pull",
    ):
        for route in ("manifests/tagtest0", "tags/list", f"blobs/{DUMMY_DIGEST}"):
            answer = await check.upstream_untouched(
                lambda n=name, r=route: check.request("GET", f"/v2/{n}/{r}")
            )
            assert answer.status == 400, (name, route)
            assert answer.error_code() == "NAME_INVALID"


@specify("spec: a tag outside the tag grammar is 404 MANIFEST_UNKNOWN, without asking upstream")
async def impossible_tags(check: Check) -> None:
    for reference in ("-bad", "t" * 129, ".hidden", "a%2fb", "%00", ""):
        for method in ("GET", "HEAD"):
            answer = await check.upstream_untouched(
                lambda m=method, r=reference: check.request(m, f"/v2/<name>/manifests/{r}")
            )
            assert answer.status == 404, (method, reference)
            if method == "GET":
                assert answer.error_code() == "MANIFEST_UNKNOWN"


@specify("spec: a malformed digest, or one edgecache cannot verify, is 400 DIGEST_INVALID")
async def invalid_digests(check: Check) -> None:
    bad = [
        "sha256:totallywrong",
        "sha256:" + "A" * 64,  # upper-case hex: not canonical
        "sha256:" + "a" * 63,
        "sha512:" + "a" * 64,
        "md5:" + "a" * 32,  # an algorithm edgecache cannot verify
        "blake3:" + "a" * 64,
        "sha256:",
    ]
    for digest in bad:
        for route in ("manifests", "blobs"):
            answer = await check.upstream_untouched(
                lambda d=digest, r=route: check.request("GET", f"/v2/<name>/{r}/{d}")
            )
            assert answer.status == 400, (route, digest)
            assert answer.error_code() == "DIGEST_INVALID"


@pytest.mark.parametrize("spec", CHECKS, ids=[text for text, _ in CHECKS])
async def test_pull_conformance(
    edge: Edge, origin: Registry, suite: Suite, spec: tuple[str, CheckFn]
) -> None:
    """One check of the suite, cold (empty cache) then warm (the same requests again)."""
    _text, run = spec
    for phase in PHASES:
        try:
            await run(Check(edge, origin, suite, phase))
        except AssertionError as exc:
            raise AssertionError(f"{phase} pass: {exc}") from exc
        await edge.instance.flights.settled()  # fills committed: the warm pass sees them stored


def test_every_pull_check_of_the_suite_is_here() -> None:
    """The suite's pull-side Specify texts (01 minus Setup pushes and Teardown, 06, 07), each once."""
    names = [text.split(": ", 1)[1] for text, _ in CHECKS if not text.startswith("spec:")]
    assert len(names) == 20
    assert names.count("400 response body should contain OCI-conforming JSON message") == 2
