"""Upstream health as the pull path sees it, on an injected clock: when edgecache stops asking a
failing or rate-limiting upstream, for how long, and how it comes back. No sockets, no sleeping (the
probe loop's waits are all due at once)."""

from __future__ import annotations

import asyncio
import email.utils

import pytest

from edgecache import errors
from edgecache.upstream.health import (
    DEFAULT_RETRY_AFTER,
    MAX_RETRY_AFTER,
    UpstreamHealth,
    parse_ratelimit,
    parse_retry_after,
    probe_until_up,
)
from edgecache.upstream.pace import BodyPace, Deadlines
from tests.support.clock import Clock


@pytest.fixture
def clock() -> Clock:
    return Clock()


def health(clock: Clock, down_after: int = 3, down_for: float = 30.0) -> UpstreamHealth:
    return UpstreamHealth(down_after, down_for, clock=clock)


def test_a_new_upstream_is_up_and_may_be_asked(clock: Clock) -> None:
    h = health(clock)
    assert h.state == "up"
    h.check("docker.io")  # no exception: requests go upstream


def test_down_only_after_down_after_consecutive_failures(clock: Clock) -> None:
    h = health(clock, down_after=3)
    h.failed()
    h.failed()
    assert h.state == "up"
    h.check("docker.io")
    h.failed()
    assert h.state == "down"
    with pytest.raises(errors.UpstreamDown) as raised:
        h.check("docker.io")
    assert raised.value.status == 503
    assert "docker.io" in str(raised.value)
    assert raised.value.retry_after == pytest.approx(1.0)


def test_a_missed_deadline_takes_it_down_at_once(clock: Clock) -> None:
    h = health(clock, down_after=3)
    h.failed(deadline=True)
    assert h.state == "down"
    with pytest.raises(errors.UpstreamDown):
        h.check("docker.io")


def test_a_success_between_failures_resets_the_count(clock: Clock) -> None:
    h = health(clock, down_after=3)
    for _ in range(2):
        h.failed()
    h.succeeded()
    for _ in range(2):
        h.failed()
    assert h.state == "up" and h.failures == 2
    h.check("docker.io")


def test_down_stays_down_until_an_answer_comes_however_long(clock: Clock) -> None:
    h = health(clock, down_after=2, down_for=30.0)
    h.failed()
    h.failed()
    clock.advance(3600)
    assert h.state == "down"  # time alone does not bring it back: a probe must answer
    with pytest.raises(errors.UpstreamDown):
        h.check("ghcr.io")
    h.succeeded()
    assert h.state == "up"
    h.check("ghcr.io")


def test_probes_start_after_a_second_and_back_off_to_down_for(clock: Clock) -> None:
    h = health(clock, down_after=1, down_for=10.0)
    assert h.probe_in() is None  # up: nothing to probe
    h.failed()
    waits = []
    for _ in range(6):
        wait = h.probe_in()
        assert wait is not None
        waits.append(wait)
        clock.advance(wait)
        assert h.probe_in() == 0.0  # due now
        h.probe_failed()
    assert waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_the_first_success_brings_it_back_for_everyone(clock: Clock) -> None:
    h = health(clock, down_after=2, down_for=30.0)
    h.failed()
    h.failed()
    clock.advance(1)
    h.succeeded()
    assert h.state == "up" and h.probe_in() is None
    h.failed()  # a single failure after recovery does not take it down again
    assert h.state == "up"
    h.check("ghcr.io")


def test_going_down_again_soon_after_recovering_keeps_backing_off(clock: Clock) -> None:
    h = health(clock, down_after=1, down_for=30.0)
    h.failed()
    for _ in range(3):
        h.probe_failed()  # 2, 4, 8
    h.succeeded()
    clock.advance(5)
    h.failed()  # flapping: the next probe waits longer, not a second
    assert h.probe_in() == 16.0
    h.succeeded()
    clock.advance(31)  # up for longer than down_for: a new outage starts over
    h.failed()
    assert h.probe_in() == 1.0


def test_down_for_below_a_second_still_probes_every_second(clock: Clock) -> None:
    h = health(clock, down_after=1, down_for=0.0)
    h.failed()
    h.probe_failed()
    assert h.probe_in() == 1.0


class AlwaysDue(Clock):
    """Time that moves a probe's worth on every reading, so every probe is due at once."""

    def __call__(self) -> float:
        self.now += 100.0
        return self.now


async def test_the_probe_loop_asks_until_an_answer_and_not_after_a_request_found_it_back() -> None:
    """The one loop the upstream client and the shared tier both run while down, each with its own
    question: asked until it says yes (then up, and the loop ends); and when a request still in flight
    finds the upstream back while the loop waits, nothing more is asked."""
    down = UpstreamHealth(1, 30.0, clock=AlwaysDue())
    down.failed()
    asked = 0

    async def answers() -> bool:
        nonlocal asked
        asked += 1
        return asked == 3

    await asyncio.wait_for(probe_until_up(down, answers, down.succeeded), 5)
    assert asked == 3 and down.state == "up"
    down.failed()
    probing = asyncio.create_task(probe_until_up(down, answers, down.succeeded))
    await asyncio.sleep(0)  # the loop is waiting for its next probe
    down.succeeded()  # a request found it back meanwhile
    await asyncio.wait_for(probing, 5)
    assert asked == 3


def test_reconfigure_changes_thresholds_for_later_failures(clock: Clock) -> None:
    h = health(clock, down_after=3, down_for=30.0)
    h.failed()
    h.reconfigure(down_after=1, down_for=5.0)
    h.failed()
    assert h.state == "down"
    for _ in range(4):
        h.probe_failed()
    assert h.probe_in() == 5.0  # the new ceiling


def test_rate_limited_blocks_until_retry_after_and_says_how_long(clock: Clock) -> None:
    h = health(clock)
    h.rate_limited(60.0)
    assert h.state == "rate_limited"
    clock.advance(15)
    with pytest.raises(errors.UpstreamRateLimited) as raised:
        h.check("docker.io")
    assert raised.value.status == 429 and raised.value.code == "TOOMANYREQUESTS"
    assert raised.value.retry_after == pytest.approx(45.0)
    clock.advance(45)
    assert h.state == "up"
    h.check("docker.io")


def test_rate_limiting_does_not_count_as_failures(clock: Clock) -> None:
    h = health(clock, down_after=1)
    h.rate_limited(10.0)
    clock.advance(10)
    assert h.failures == 0 and h.state == "up"


def test_rate_limited_wins_over_down_while_both_apply(clock: Clock) -> None:
    h = health(clock, down_after=1, down_for=30.0)
    h.failed()
    h.rate_limited(10.0)
    assert h.state == "rate_limited"
    with pytest.raises(errors.UpstreamRateLimited):
        h.check("docker.io")
    clock.advance(10)
    assert h.state == "down"  # the rate limit ended first; still down until a probe answers
    with pytest.raises(errors.UpstreamDown):
        h.check("docker.io")


# -- Retry-After and Docker Hub's ratelimit headers ---------------------------------------------


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, DEFAULT_RETRY_AFTER),
        ("", DEFAULT_RETRY_AFTER),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 1.0),  # never "retry at once": at least a second
        ("999999", MAX_RETRY_AFTER),  # an upstream cannot block us for days
        ("-5", DEFAULT_RETRY_AFTER),
        ("1.5", DEFAULT_RETRY_AFTER),
        ("soon", DEFAULT_RETRY_AFTER),
    ],
)
def test_retry_after_in_seconds(header: str | None, seconds: float) -> None:
    assert parse_retry_after(header) == seconds


def test_retry_after_as_an_http_date_counts_from_now() -> None:
    now = 1_700_000_000.0
    in_90s = email.utils.formatdate(now + 90, usegmt=True)
    assert parse_retry_after(in_90s, now=now) == pytest.approx(90.0)
    an_hour_ago = email.utils.formatdate(now - 3600, usegmt=True)
    assert parse_retry_after(an_hour_ago, now=now) == 1.0
    next_week = email.utils.formatdate(now + 7 * 86400, usegmt=True)
    assert parse_retry_after(next_week, now=now) == MAX_RETRY_AFTER


@pytest.mark.parametrize(
    ("header", "remaining"),
    [
        ("76;w=21600", 76.0),
        ("100", 100.0),
        (" 0 ; w=21600", 0.0),
        (None, None),
        ("", None),
        ("lots;w=21600", None),
    ],
)
def test_docker_hub_ratelimit_remaining(header: str | None, remaining: float | None) -> None:
    assert parse_ratelimit(header) == remaining


def test_a_trickle_is_a_whole_window_below_the_rate_and_time_not_reading_does_not_count(
    clock: Clock,
) -> None:
    deadlines = Deadlines(connect=5, headers=10, stall=15, min_rate=1000, rate_window=10)
    pace = BodyPace(deadlines, clock=clock)
    for _ in range(9):
        clock.advance(1)
        pace.note(100)  # 100 B/s, but the window is not over yet
    clock.advance(30)
    pace.exclude(30)  # waiting for readers to make room: not the upstream's slowness
    pace.note(100)
    clock.advance(1)
    with pytest.raises(errors.UpstreamStalled):
        pace.note(100)  # ten seconds of reading at 100 B/s: a trickle
    fast = BodyPace(deadlines, clock=clock)
    for _ in range(30):
        clock.advance(1)
        fast.note(5000)  # well above the rate: never a stall
    off = BodyPace(Deadlines(connect=5, headers=10, stall=15, min_rate=0, rate_window=10), clock=clock)
    clock.advance(100)
    off.note(1)  # min_rate 0: no check
