"""A write-ahead log damaged in the middle (the journal review, h7): SQLite's recovery stops at
the first frame whose checksum fails and drops every frame after it without a word, commits
included, and the first write after that starts the WAL over, over the evidence. The daemon
refuses such a journal; a torn tail (a power cut mid-write) and stale frames of an older
WAL generation are normal and open as before. Real files, and a real writer killed with
SIGKILL so that its WAL is left behind (a clean close checkpoints and deletes it)."""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bridge.daemon.journal import Journal, JournalError
from bridge.protocol.transaction import TxKey

ROOT = Path(__file__).resolve().parents[1]


def killed_writer(path: Path, saves: int, then: str = "") -> None:
    """A process that commits `saves` transactions S0.. (one commit each, several frames:
    the row, its indexes, an outbox message), runs `then`, and is SIGKILLed."""
    script = textwrap.dedent(f"""
        import os, signal
        from bridge.daemon.journal import Journal
        from tests.test_journal import make_txn
        j = Journal({str(path)!r})
        for i in range({saves}):
            j.save(make_txn(f"S{{i}}"), [("t", b"payload", 1, False)])
        {then}
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL


def frames(wal: Path) -> tuple[int, tuple[int, int], list[tuple[int, tuple[int, int]]]]:
    """The WAL's page size, its header's salts, and each whole frame's (commit size, salts)."""
    data = wal.read_bytes()
    page_size, = struct.unpack(">I", data[8:12])
    salts = struct.unpack(">2I", data[16:24])
    size = 24 + page_size
    out = []
    for offset in range(32, len(data) - size + 1, size):
        _page, commit, s1, s2 = struct.unpack(">4I", data[offset:offset + 16])
        out.append((commit, (s1, s2)))
    return page_size, salts, out


def test_a_byte_gone_bad_in_an_early_frame_is_refused_and_the_wal_kept(tmp_path):
    path = tmp_path / "j.sqlite3"
    wal = tmp_path / "j.sqlite3-wal"
    killed_writer(path, 11)
    page_size, salts, listed = frames(wal)
    assert sum(commit != 0 for commit, _ in listed[3:]) >= 5  # commits after frame 3
    data = bytearray(wal.read_bytes())
    data[32 + 2 * (24 + page_size) + 24 + 500] ^= 0xFF  # page data of frame 3
    wal.write_bytes(bytes(data))

    for _ in range(2):  # and so again at the next start: nothing was changed
        with pytest.raises(JournalError) as refused:
            Journal(path)
        message = str(refused.value)
        assert f"damaged at frame 3 of {len(listed)}" in message, message
        assert "commit(s)" in message and "-shm" in message and "backup" in message
        assert wal.read_bytes() == bytes(data)


@pytest.mark.parametrize("where", [13, 17, 21], ids=["sequence", "salt-1", "salt-2"])
def test_a_byte_gone_bad_in_the_wal_header_is_refused(tmp_path, where):
    """SQLite then takes no frame at all: every commit of the WAL is dropped. With a salt
    gone bad, every frame read as another generation's and the journal opened without them
    (a review)."""
    path = tmp_path / "j.sqlite3"
    wal = tmp_path / "j.sqlite3-wal"
    killed_writer(path, 3)
    data = bytearray(wal.read_bytes())
    data[where] ^= 0x01  # under the header's checksum
    wal.write_bytes(bytes(data))
    with pytest.raises(JournalError, match=r"damaged at its header \(frame 0\)"):
        Journal(path)
    assert wal.read_bytes() == bytes(data)


@pytest.mark.parametrize("torn", ["cut", "garbled"])
def test_a_torn_tail_opens_as_before(tmp_path, torn):
    """The last transaction's frames written but its commit frame torn: cut in its middle,
    or half of its page stale. Its other frames still validate: no commits are lost."""
    path = tmp_path / "j.sqlite3"
    wal = tmp_path / "j.sqlite3-wal"
    killed_writer(path, 6)
    page_size, _, listed = frames(wal)
    commits = [i for i, (commit, _) in enumerate(listed) if commit]
    assert commits[-1] == len(listed) - 1 and commits[-1] - commits[-2] >= 2  # a whole frame before
    size = 24 + page_size
    end = 32 + len(listed) * size
    data = wal.read_bytes()
    if torn == "cut":
        data = data[:end - size // 2]
    else:
        data = data[:end - page_size // 2] + bytes(page_size // 2)
    wal.write_bytes(data)

    journal = Journal(path)
    assert journal.get(TxKey("R1", "S4")) is not None  # the commits before the torn one
    assert journal.get(TxKey("R1", "S5")) is None
    journal.close()


def test_stale_frames_of_an_older_wal_generation_open_as_before(tmp_path):
    """Checkpointed and started over (RESTART): the next commits overwrite the WAL from its
    start, under new salts, and the older generation's frames are still after them."""
    path = tmp_path / "j.sqlite3"
    wal = tmp_path / "j.sqlite3-wal"
    killed_writer(path, 12, then=(
        "j._db.execute('PRAGMA wal_checkpoint(RESTART)').fetchone(); "
        "[j.save(make_txn(f'N{i}')) for i in range(2)]"))
    _, salts, listed = frames(wal)
    assert any(s != salts for _, s in listed)  # (the premise: older frames are there)

    journal = Journal(path)
    assert journal.get(TxKey("R1", "N1")) is not None
    assert journal.get(TxKey("R1", "S11")) is not None
    journal.close()


@pytest.mark.parametrize("wal_bytes", [None, b"", b"\x37\x7f\x06\x82" + bytes(28)])
def test_no_wal_or_an_empty_one_opens_as_before(tmp_path, wal_bytes):
    path = tmp_path / "j.sqlite3"
    wal = tmp_path / "j.sqlite3-wal"
    journal = Journal(path)
    from tests.test_journal import make_txn
    journal.save(make_txn("S1"))
    journal.close()
    assert not wal.exists()
    if wal_bytes is not None:
        wal.write_bytes(wal_bytes)
    journal = Journal(path)
    assert journal.get(TxKey("R1", "S1")) is not None
    journal.close()
