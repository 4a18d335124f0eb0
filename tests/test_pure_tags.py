"""Pure checks of tag-list paging (edgecache.oci.page_tags / page_tag_list), the distribution spec's
rules for `GET /v2/<name>/tags/list?n=&last=`: no sockets, no disk."""

from __future__ import annotations

import json

import pytest

from edgecache.oci import TagPage, page_tag_list, page_tags

# As distribution 2.8 lists them: neither sorted nor paged.
UPSTREAM = ["test0", "test3", "latest", "Zed", "2", "a_b", "A", "10", "1.0"]
LEXICAL = ["1.0", "10", "2", "A", "Zed", "a_b", "latest", "test0", "test3"]


def test_tags_are_in_lexical_byte_order() -> None:
    assert page_tags(UPSTREAM, None, None) == TagPage(LEXICAL, more=False)


@pytest.mark.parametrize(
    ("n", "last", "tags", "more"),
    [
        (2, None, ["1.0", "10"], True),
        (2, "10", ["2", "A"], True),
        (3, "a_b", ["latest", "test0", "test3"], False),  # exactly the rest: nothing more
        (5, "latest", ["test0", "test3"], False),
        (None, "latest", ["test0", "test3"], False),  # last alone: everything after it
        (None, "1.0", LEXICAL[1:], False),  # exclusive of last (the issue's `last=1.0`)
        (2, "test3", [], False),  # last is the last tag
        (2, "b", ["latest", "test0"], True),  # last need not be a tag of the repository
        (2, "0", ["1.0", "10"], True),  # before every tag
        (1000, None, LEXICAL, False),
    ],
)
def test_n_and_last_page_the_sorted_list(
    n: int | None, last: str | None, tags: list[str], more: bool
) -> None:
    assert page_tags(UPSTREAM, n, last) == TagPage(tags, more)


def test_n_zero_is_an_empty_page_with_nothing_more() -> None:
    """The spec: when n is zero, an empty list and no Link header."""
    assert page_tags(UPSTREAM, 0, None) == TagPage([], more=False)
    assert page_tags(UPSTREAM, 0, "2") == TagPage([], more=False)


def test_walking_the_pages_gives_every_tag_once() -> None:
    seen: list[str] = []
    last = None
    while True:
        page = page_tags(UPSTREAM, 4, last)
        seen += page.tags
        if not page.more:
            break
        last = page.tags[-1]
    assert seen == LEXICAL


def test_duplicates_and_tags_outside_the_grammar_are_dropped() -> None:
    """A page's last tag goes into the Link: only tags a client could send back as `last`."""
    tags = ["b", "a", "b", "../x", "-bad", "", "x" * 129, "ok\n"]
    assert page_tags(tags, None, None) == TagPage(["a", "b"], more=False)


def test_upstream_bodies() -> None:
    body = json.dumps({"name": "conf/tags", "tags": UPSTREAM}).encode()
    assert page_tag_list(body, 2, "2") == TagPage(["A", "Zed"], more=True)
    # distribution answers `null` for a repository whose tags were all deleted
    assert page_tag_list(b'{"name": "x", "tags": null}', None, None) == TagPage([], more=False)
    assert page_tag_list(b'{"name": "x"}', None, None) == TagPage([], more=False)
    assert page_tag_list(b'{"tags": ["a", 1, null, "b"]}', None, None) == TagPage(["a", "b"], False)
    for bad in [b"", b"not json", b"[]", b'{"tags": "a"}', b'{"tags": {"a": 1}}', b"\xff"]:
        with pytest.raises(ValueError):
            page_tag_list(bad, None, None)
