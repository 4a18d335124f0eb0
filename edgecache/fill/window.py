"""A fill passed through without a disk: the bytes its readers still need, in a bounded memory window.

When a blob cannot be stored (bigger than the room the cache can make, or the disk filled during an
earlier try), its fill writes into a `StreamWindow` instead of a spool file. The window keeps at most
`capacity` bytes: what the slowest reader has not sent yet. The fill's reading thread waits while the
window is full (the upstream connection then waits too, by TCP's own flow control), so memory stays
at `capacity` whatever the blob size and the number of readers, and the slowest reader paces the fill:
with no disk to hold the bytes, the other choice would be to cut it. A reader that arrives after the
bytes it needs have left the window cannot join; the pull path starts another fill for it. As with a
spool, the digest is checked as the bytes pass, and the last byte is held back until it matches.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from edgecache import errors
from edgecache.oci import Digest

CAPACITY = 4 * 1024 * 1024
READ_MAX = 1024 * 1024  # the most a reader copies out at once
# A window full for this long means a reader stopped reading (or never started): the fill gives up
# rather than hold an upstream connection for ever.
FULL_FOR = 60.0


class StreamWindow:
    """The sink of a pass-through fill: `append` on the fill's thread, `Cursor`s on the event loop."""

    def __init__(
        self, digest: Digest, capacity: int = CAPACITY, full_for: float = FULL_FOR, *, pending: int = 1
    ) -> None:
        self.digest = digest
        self.capacity = capacity
        self._full_for = full_for
        self._hasher = digest.hasher()
        self._blocks: deque[tuple[int, bytes]] = deque()  # (offset, bytes), oldest first
        self._kept = 0  # bytes in _blocks
        self._cursors: set[Cursor] = set()
        # Readers that joined the fill before this window existed (they came together with the
        # first) and will claim their place: until they have, nothing may leave it.
        self._pending = pending
        self._cond = threading.Condition()
        self._closed = False
        self.written = 0

    # -- the fill's side (its reading thread) -----------------------------------------------------

    def append(self, data: bytes | memoryview) -> None:
        """Keep and hash one block; waits while the window is full of bytes a reader still needs."""
        block = bytes(data)
        deadline = time.monotonic() + self._full_for
        with self._cond:
            self._drop_sent()
            while self._closed or (self._kept and self._kept + len(block) > self.capacity):
                if self._closed:
                    raise errors.UpstreamUnavailable("pass-through fill cancelled")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise errors.UpstreamUnavailable("readers stopped reading a pass-through fill")
                self._cond.wait(min(left, 1.0))
                self._drop_sent()
            self._blocks.append((self.written, block))
            self._kept += len(block)
            self.written += len(block)
        self._hasher.update(block)

    def verify(self) -> None:
        if self._hasher.hexdigest() != self.digest.hex:
            raise errors.UpstreamDigestMismatch("blob content does not match its digest")

    def discard(self) -> None:
        """Nothing on disk to remove; the bytes go with the window."""

    def close(self) -> None:
        """Release the memory and wake a waiting `append` (the fill is over or cancelled)."""
        with self._cond:
            self._closed = True
            self._blocks.clear()
            self._kept = 0
            self._cond.notify_all()

    def _drop_sent(self) -> None:
        """Forget blocks every reader has sent (call with the lock held)."""
        if self._pending > 0:
            return
        floor = min((c.position for c in self._cursors), default=self.written)
        while self._blocks and self._blocks[0][0] + len(self._blocks[0][1]) <= floor:
            _, block = self._blocks.popleft()
            self._kept -= len(block)

    # -- the readers' side (the event loop) -----------------------------------------------------

    @property
    def low(self) -> int:
        """The first offset the window still holds."""
        with self._cond:
            return self._low()

    def _low(self) -> int:
        return self._blocks[0][0] if self._blocks else self.written

    def claim(self, start: int, *, pending: bool = False) -> Cursor | None:
        """A reader from `start`, holding its bytes in the window; None when they have already left.
        `pending`: one of the readers counted when the window was made (its place was kept)."""
        with self._cond:
            if pending and self._pending > 0:
                self._pending -= 1
                self._cond.notify_all()
            if start < self._low() or self._closed:
                return None
            cursor = Cursor(self, start)
            self._cursors.add(cursor)
            return cursor

    def release_pending(self) -> None:
        """A reader counted when the window was made will not claim it after all."""
        with self._cond:
            if self._pending > 0:
                self._pending -= 1
                self._cond.notify_all()

    def _read(self, offset: int, length: int) -> bytes:
        with self._cond:
            for block_offset, block in self._blocks:
                end = block_offset + len(block)
                if block_offset <= offset < end:
                    start = offset - block_offset
                    return block[start : start + min(length, READ_MAX, end - offset)]
        raise errors.UpstreamUnavailable("pass-through bytes are no longer held")

    def _moved(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _release(self, cursor: Cursor) -> None:
        with self._cond:
            self._cursors.discard(cursor)
            self._cond.notify_all()


class Cursor:
    """One reader's place in a window: bytes before `position` may leave it."""

    def __init__(self, window: StreamWindow, position: int) -> None:
        self._window = window
        self.position = position

    def read(self, offset: int, length: int) -> bytes:
        """Up to `length` (at most READ_MAX) bytes from `offset`, which must be readable already."""
        return self._window._read(offset, length)

    def advance(self, position: int) -> None:
        """Everything before `position` is sent: the fill may let it go."""
        self.position = position
        self._window._moved()

    def release(self) -> None:
        self._window._release(self)
