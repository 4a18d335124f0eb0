"""The cache index (SQLite, `<root>/index.db`): what is stored, how big, when last used, what is pinned.

It makes eviction cheap: the coldest entries come from an index on last access, never from a scan of
the disk. It survives restarts and crashes (WAL journal; every change is one transaction), and when it
is lost or corrupt it is rebuilt from the store at start. The disk is the truth: `reconcile` makes the
index agree with it. All CacheIndex calls are blocking: the server runs them on one worker thread
(`IndexWorker`), the CLI directly; SQLite's locking lets both work on one cache at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from edgecache.store.identity import FileIdentity

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    digest TEXT PRIMARY KEY,
    kind TEXT NOT NULL,              -- blob | manifest
    size INTEGER NOT NULL,
    last_access REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0,
    upstream TEXT NOT NULL DEFAULT '',
    repository TEXT NOT NULL DEFAULT '',
    mtime_ns INTEGER,                -- with size and inode: the stored file's identity (NULL: unknown)
    inode INTEGER,
    verified_at REAL                 -- when its bytes last hashed to the digest (NULL: never here)
);
CREATE INDEX IF NOT EXISTS entries_by_access ON entries (last_access);
CREATE TABLE IF NOT EXISTS pins (
    upstream TEXT NOT NULL,
    repository TEXT NOT NULL,        -- glob pattern
    tag TEXT NOT NULL,               -- glob pattern
    PRIMARY KEY (upstream, repository, tag)
);
CREATE TABLE IF NOT EXISTS pinned (
    digest TEXT PRIMARY KEY          -- reachable from a pinned image; may not be stored yet
);
CREATE TABLE IF NOT EXISTS members (  -- this repository is known to contain this digest
    upstream TEXT NOT NULL,
    repository TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (upstream, repository, digest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS members_by_digest ON members (digest);
"""
# Columns added after 0.3.0's first index.db files; an older file gets them (NULL: unknown) at open.
ADDED_COLUMNS = (("mtime_ns", "INTEGER"), ("inode", "INTEGER"), ("verified_at", "REAL"))
# Named, never `*`: Entry's fields, in order, whatever columns a later version adds.
ENTRY_COLUMNS = "digest, kind, size, last_access, hits, upstream, repository, mtime_ns, inode, verified_at"
AFTER_MIGRATION = "CREATE INDEX IF NOT EXISTS entries_by_verified ON entries (verified_at);"


CORRUPT = ("SQLITE_CORRUPT", "SQLITE_NOTADB")


@dataclass(frozen=True)
class Entry:
    digest: str
    kind: str
    size: int
    last_access: float
    hits: int
    upstream: str
    repository: str
    mtime_ns: int | None = None
    inode: int | None = None
    verified_at: float | None = None

    @property
    def identity(self) -> FileIdentity | None:
        if self.mtime_ns is None or self.inode is None:
            return None
        return FileIdentity(self.size, self.mtime_ns, self.inode)


@dataclass(frozen=True)
class Pin:
    upstream: str
    repository: str
    tag: str

    def matches(self, upstream: str, repository: str, tag: str) -> bool:
        return (
            upstream == self.upstream
            and fnmatch.fnmatchcase(repository, self.repository)
            and fnmatch.fnmatchcase(tag, self.tag)
        )

    def __str__(self) -> str:
        return f"{self.upstream}/{self.repository}:{self.tag}"


class CacheIndex:
    def __init__(self, path: Path) -> None:
        self.path = path
        # Why this index starts empty, when it does: "missing" (no file: a first start, or lost while
        # stopped) or "corrupt" (unreadable: moved aside). None: opened as it was left.
        self.rebuilt: str | None = None
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        existed = self.path.exists()
        db: sqlite3.Connection | None = None
        try:
            db = self._connect()
            db.execute("SELECT count(*) FROM entries").fetchone()
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            self.rebuilt = None if existed else "missing"
            return db
        except sqlite3.DatabaseError as exc:
            if db is not None:
                db.close()
            if isinstance(exc, sqlite3.OperationalError) and exc.sqlite_errorname not in CORRUPT:
                raise  # locked, unreadable, a disk error: not a reason to set the index aside
            aside = self._move_aside()
            log.error(
                "cache index %s is unreadable (%s): moved aside to %s; rebuilding it from the store",
                self.path,
                exc,
                aside,
            )
            self.rebuilt = "corrupt"
            return self._connect()

    def _move_aside(self) -> Path:
        """Keep an unreadable index for a post-mortem (index.db.corrupt-<time>), out of the way."""
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
        return aside

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        _migrate(db)
        return db

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- entries -------------------------------------------------------------------------------

    def add(
        self,
        digest: str,
        kind: str,
        size: int,
        upstream: str = "",
        repository: str = "",
        identity: FileIdentity | None = None,
    ) -> None:
        """A verified file was just stored: admission counts as a verification."""
        mtime_ns, inode = (identity.mtime_ns, identity.inode) if identity else (None, None)
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "INSERT INTO entries (digest, kind, size, last_access, upstream, repository, mtime_ns, "
                "inode, verified_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO UPDATE "
                "SET size = excluded.size, last_access = excluded.last_access, mtime_ns = "
                "excluded.mtime_ns, inode = excluded.inode, verified_at = excluded.verified_at",
                (digest, kind, size, now, upstream, repository, mtime_ns, inode, now),
            )

    def identities(self) -> dict[str, FileIdentity]:
        """{digest: identity} of every entry whose identity is known (a whole-index view, for checks)."""
        rows = self._db.execute(
            "SELECT digest, size, mtime_ns, inode FROM entries "
            "WHERE mtime_ns IS NOT NULL AND inode IS NOT NULL"
        )
        return {digest: FileIdentity(size, mtime_ns, inode) for digest, size, mtime_ns, inode in rows}

    def record_identities(self, rows: Iterable[tuple[str, FileIdentity]]) -> None:
        """Identities first seen by a hit, where none was known (never replacing a known one)."""
        with self._transaction() as db:
            db.executemany(
                "UPDATE entries SET mtime_ns = ?, inode = ? WHERE digest = ? AND size = ? "
                "AND mtime_ns IS NULL",
                [(i.mtime_ns, i.inode, digest, i.size) for digest, i in rows],
            )

    def mark_verified(self, rows: Iterable[tuple[str, FileIdentity | None, float]]) -> None:
        """The scrubber re-hashed these: (digest, identity it saw, when). With no identity, only the
        time moves (the entry goes to the back of the queue; what is known of the file stays)."""
        with self._transaction() as db:
            db.executemany(
                "UPDATE entries SET verified_at = ?, mtime_ns = coalesce(?, mtime_ns), "
                "inode = coalesce(?, inode) WHERE digest = ?",
                [
                    (when, i.mtime_ns if i else None, i.inode if i else None, digest)
                    for digest, i, when in rows
                ],
            )

    def least_recently_verified(self, limit: int) -> list[Entry]:
        """The scrubber's queue: never verified (NULL sorts first), then the longest ago."""
        rows = self._db.execute(f"SELECT {ENTRY_COLUMNS} FROM entries ORDER BY verified_at LIMIT ?", (limit,))
        return [Entry(*row) for row in rows]

    def touch(self, accesses: Iterable[tuple[str, float, int]]) -> None:
        """Record hits in one transaction: (digest, time, count) batched by the caller."""
        with self._transaction() as db:
            db.executemany(
                "UPDATE entries SET last_access = max(last_access, ?), hits = hits + ? WHERE digest = ?",
                [(when, count, digest) for digest, when, count in accesses],
            )

    def remove(self, digests: Iterable[str]) -> None:
        rows = [(d,) for d in digests]
        with self._transaction() as db:
            db.executemany("DELETE FROM entries WHERE digest = ?", rows)
            db.executemany("DELETE FROM members WHERE digest = ?", rows)

    # -- repository membership -----------------------------------------------------------------

    def add_members(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """(upstream, repository, digest) facts learnt from upstream."""
        with self._transaction() as db:
            db.executemany("INSERT OR IGNORE INTO members VALUES (?, ?, ?)", list(rows))

    def unheld_count(self) -> int:
        """Stored digests no repository is known to hold (their facts were lost with an index)."""
        row = self._db.execute(
            "SELECT count(*) FROM entries WHERE NOT EXISTS "
            "(SELECT 1 FROM members WHERE members.digest = entries.digest)"
        ).fetchone()
        return int(row[0])

    def is_member(self, upstream: str, repository: str, digest: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM members WHERE upstream = ? AND repository = ? AND digest = ?",
            (upstream, repository, digest),
        ).fetchone()
        return row is not None

    def get(self, digest: str) -> Entry | None:
        row = self._db.execute(f"SELECT {ENTRY_COLUMNS} FROM entries WHERE digest = ?", (digest,)).fetchone()
        return Entry(*row) if row else None

    def totals(self) -> dict[str, tuple[int, int]]:
        """(entries, bytes) per kind."""
        rows = self._db.execute("SELECT kind, count(*), coalesce(sum(size), 0) FROM entries GROUP BY kind")
        return {kind: (count, size) for kind, count, size in rows}

    def pinned_bytes(self) -> int:
        row = self._db.execute(
            "SELECT coalesce(sum(size), 0) FROM entries WHERE digest IN (SELECT digest FROM pinned)"
        ).fetchone()
        return int(row[0])

    def coldest(self, limit: int) -> list[Entry]:
        """Least recently used first, pinned content left out."""
        rows = self._db.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE digest NOT IN (SELECT digest FROM pinned) "
            "ORDER BY last_access LIMIT ?",
            (limit,),
        )
        return [Entry(*row) for row in rows]

    def largest_repositories(self, limit: int) -> list[tuple[str, str, int, int, int]]:
        """(upstream, repository, entries, bytes, hits), biggest first."""
        rows = self._db.execute(
            "SELECT upstream, repository, count(*), sum(size), sum(hits) FROM entries "
            "GROUP BY upstream, repository ORDER BY sum(size) DESC LIMIT ?",
            (limit,),
        )
        return [tuple(row) for row in rows]

    def all_entries(self) -> list[Entry]:
        rows = self._db.execute(f"SELECT {ENTRY_COLUMNS} FROM entries ORDER BY digest")
        return [Entry(*row) for row in rows]

    # -- pins ----------------------------------------------------------------------------------

    def add_pin(self, pin: Pin) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO pins VALUES (?, ?, ?)", (pin.upstream, pin.repository, pin.tag))

    def remove_pin(self, pin: Pin) -> bool:
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM pins WHERE upstream = ? AND repository = ? AND tag = ?",
                (pin.upstream, pin.repository, pin.tag),
            )
            return cursor.rowcount > 0

    def pins(self) -> list[Pin]:
        return [Pin(*row) for row in self._db.execute("SELECT * FROM pins ORDER BY 1, 2, 3")]

    def pin_digests(self, digests: Iterable[str]) -> None:
        with self._transaction() as db:
            db.executemany("INSERT OR IGNORE INTO pinned VALUES (?)", [(d,) for d in digests])

    def set_pinned(self, digests: Iterable[str]) -> None:
        """Replace the whole pinned set (after pins changed and were walked again)."""
        with self._transaction() as db:
            db.execute("DELETE FROM pinned")
            db.executemany("INSERT OR IGNORE INTO pinned VALUES (?)", [(d,) for d in digests])

    def pinned_digests(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT digest FROM pinned")}

    def data_version(self) -> int:
        """Changes whenever another connection (the CLI beside the server) commits a change."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    # -- agreement with the disk ---------------------------------------------------------------

    def reconcile(self, on_disk: dict[str, tuple[str, int]]) -> tuple[list[tuple[str, str, int]], list[str]]:
        """Make the index list exactly what is on disk ({digest: (kind, size)}); (added or changed
        rows, dropped digests)."""
        indexed = {d: (k, s) for d, k, s in self._db.execute("SELECT digest, kind, size FROM entries")}
        missing = [d for d in indexed if d not in on_disk]
        changed = [(d, k, s) for d, (k, s) in on_disk.items() if indexed.get(d) != (k, s)]
        now = time.time()
        with self._transaction() as db:
            db.executemany("DELETE FROM entries WHERE digest = ?", [(d,) for d in missing])
            # Found on disk, or not the size indexed: nothing is known of these files, so their
            # identity and verification are unknown until the scrubber hashes them (or a hit records
            # what it sees, still to be hashed).
            db.executemany(
                "INSERT INTO entries (digest, kind, size, last_access) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (digest) DO UPDATE SET kind = excluded.kind, size = excluded.size, "
                "mtime_ns = NULL, inode = NULL, verified_at = NULL",
                [(d, k, s, now) for d, k, s in changed],
            )
        return changed, missing

    def apply_walk(
        self,
        unlisted: list[tuple[str, str]],
        vanished: list[tuple[str, str]],
        size_of: Callable[[str, str], int | None],
    ) -> tuple[list[tuple[str, str, int]], list[str]]:
        """What a walk of the disk found: files the index does not list ((digest, kind): added with
        their size) and rows whose file was not there ((digest, kind): dropped). Each is checked
        against the file again first: the walk may be older than a store or an eviction made since.
        (added, dropped), as `reconcile` returns them."""
        added = [(d, k, size) for d, k in unlisted if (size := size_of(k, d)) is not None]
        dropped = [d for d, k in vanished if size_of(k, d) is None]
        now = time.time()
        with self._transaction() as db:
            db.executemany("DELETE FROM entries WHERE digest = ?", [(d,) for d in dropped])
            db.executemany(
                "INSERT INTO entries (digest, kind, size, last_access) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (digest) DO NOTHING",
                [(d, k, s, now) for d, k, s in added],
            )
        return added, dropped

    def held_separately(self) -> dict[str, tuple[str, int]]:
        """{digest: (kind, size)} of every entry (what the index vouches for), on a connection of its
        own (call it from any thread): reading a million rows takes a second, and hits asking the
        index about one digest meanwhile must not queue behind it."""
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        try:
            return {d: (k, s) for d, k, s in db.execute("SELECT digest, kind, size FROM entries")}
        finally:
            db.close()


def _migrate(db: sqlite3.Connection) -> None:
    """Add the columns an index.db from before them lacks (NULL: unknown, never trusted)."""
    # One transaction: the CLI may open the same index.db at the same moment as the server.
    db.execute("BEGIN IMMEDIATE")
    try:
        have = {row[1] for row in db.execute("PRAGMA table_info(entries)")}
        for name, sql_type in ADDED_COLUMNS:
            if name not in have:
                db.execute(f"ALTER TABLE entries ADD COLUMN {name} {sql_type}")
        db.execute(AFTER_MIGRATION)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class IndexWorker:
    """The index on its own thread, for the server: SQLite work never blocks the event loop, and
    one thread serialises every call on the one connection. Shared by the keeper (entries, pins)
    and membership (repository facts)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgecache-index")
        self._index: CacheIndex | None = None

    async def open(self) -> CacheIndex:
        """Open (or rebuild, when unreadable) the index on the worker thread."""
        self._index = await self.run(CacheIndex, self._path)
        return self._index

    @property
    def index(self) -> CacheIndex:
        assert self._index is not None, "IndexWorker.open() was not awaited"
        return self._index

    @property
    def is_open(self) -> bool:
        return self._index is not None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one index call on the worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def close(self) -> None:
        if self._index is not None:
            await self.run(self._index.close)
        self._executor.shutdown(wait=True)
