"""What identifies a stored file: its size, modification time and inode, as one stat gives them.

A stored file is never written in place: a fill renames a verified spool into the store, and the file
then only ever gets read. So once its identity is recorded (right after the rename), any write to it
(an operator's mistake, a stray process, a restore from backup) changes the identity, and a hit that
compares it with the fstat it already makes catches the change without reading a byte. What it cannot
catch is a change that leaves all three alone (bit rot, a write that restores the mtime): that is the
scrubber's job (`store.scrub`), which re-hashes the bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FileIdentity:
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


def judge(
    expected_size: int, recorded: FileIdentity | None, before: FileIdentity, after: FileIdentity, intact: bool
) -> str:
    """The scrubber's verdict on one file it hashed: "changed" (its identity is not the one recorded,
    or it changed while being read), "corrupt" (same identity, bytes that do not hash to the digest),
    or "ok"."""
    if before != after or before.size != expected_size:
        return "changed"
    if recorded is not None and recorded != before:
        return "changed"
    return "ok" if intact else "corrupt"
