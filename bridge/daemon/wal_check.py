"""A check SQLite does not make: whether a write-ahead log holds commits SQLite's recovery
dropped because one frame before them went bad (wal_damage). Reads the WAL's format as SQLite
documents it (https://www.sqlite.org/fileformat2.html#walformat); it only reads the file.
"""

from __future__ import annotations

import array
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

_WAL_MAGIC = {0x377F0682: False, 0x377F0683: True}  # -> checksums of big-endian words
WAL_HEADER = 32
FRAME_HEADER = 24


def _wal_checksum(data: bytes, s1: int, s2: int, big_endian: bool) -> tuple[int, int]:
    """SQLite's WAL checksum of `data` (a multiple of 8 bytes), continued from (s1, s2)."""
    words = array.array("I", data)
    if big_endian != (sys.byteorder == "big"):
        words.byteswap()
    pairs = iter(words)
    for a, b in zip(pairs, pairs):
        s1 = (s1 + a + s2) & 0xFFFFFFFF
        s2 = (s2 + b + s1) & 0xFFFFFFFF
    return s1, s2


@dataclass(frozen=True, slots=True)
class WalDamage:
    frame: int  # the frame that fails its checksum (1-based; 0: the WAL's header)
    frames: int  # whole frames in the file
    dropped: int  # whole frames of this WAL that SQLite drops with it
    commits: int  # commit frames among those


def wal_damage(wal: Path, valid: int) -> WalDamage | None:
    """Whether the write-ahead log `wal` holds commits SQLite dropped: `valid` is how many
    frames its recovery took (mxFrame: up to the last commit it found valid). SQLite stops at
    the first frame whose checksum fails and ignores every frame after it, so a byte gone bad
    in one frame silently loses all the commits after it. A torn tail (a power cut mid-write)
    and stale frames of an older generation (other salts: the file is reused from its start)
    look the same to SQLite, and are normal. Told apart here: the chain is followed from the
    last frame SQLite took to the first frame that fails (the frames between are a
    transaction whose commit SQLite did not reach); that frame's own stored checksum then
    seeds the chain through the frames after it. If one of those validates from it and is a
    commit, they were whole and committed, and only the one frame between them is bad. Only
    the frames after the last commit SQLite took are checksummed (normally none or a few).
    None when nothing committed is dropped, or the file is not a WAL this can read (SQLite
    ignores such a file too)."""
    with open(wal, "rb") as file:
        header = file.read(WAL_HEADER)
        if len(header) < WAL_HEADER:
            return None
        magic, _version, page_size, _seq, salt1, salt2, s1, s2 = struct.unpack(">8I", header)
        if (magic not in _WAL_MAGIC or page_size < 512 or page_size > 65536
                or page_size & (page_size - 1)):
            return None
        big_endian = _WAL_MAGIC[magic]
        size = FRAME_HEADER + page_size
        frames = (os.fstat(file.fileno()).st_size - WAL_HEADER) // size
        if valid >= frames:
            return None
        if valid > 0:  # the chain goes on from the last frame SQLite took
            file.seek(WAL_HEADER + (valid - 1) * size + 16)
            s1, s2 = struct.unpack(">2I", file.read(8))
        elif _wal_checksum(header[:24], 0, 0, big_endian) != (s1, s2) and frames:
            # A header that fails its own checksum: SQLite takes no frame. Its salts may be
            # what went bad (a review: every frame then read as another generation's, and
            # all commits were dropped without a word), so the frames' own are followed,
            # from the header's stored checksum, which seeds the first frame's
            file.seek(WAL_HEADER + 8)
            salt1, salt2 = struct.unpack(">2I", file.read(8))
        bad: int | None = None
        dropped = commits = 0
        file.seek(WAL_HEADER + valid * size)
        for number in range(valid + 1, frames + 1):
            data = file.read(size)
            _page, commit, f_salt1, f_salt2, c1, c2 = struct.unpack(">6I", data[:24])
            if (f_salt1, f_salt2) != (salt1, salt2):
                break  # an older generation's frame: the end of this one
            if _wal_checksum(data[:8] + data[FRAME_HEADER:], s1, s2, big_endian) != (c1, c2):
                if bad is not None:
                    break  # the end of the chain after the bad frame
                bad = number
            else:
                dropped += 1
                commits += commit != 0
            s1, s2 = c1, c2  # (the bad frame's own, as written with it)
    if not commits:  # (frames of a transaction never committed are no loss)
        return None
    # A commit on the chain before any bad frame: SQLite took none, so its header is bad
    return WalDamage(bad or 0, frames, dropped, commits)
