"""The fixtures kept in tests/fixtures/ are the project's shared originals, unchanged."""

from __future__ import annotations

import pytest

from tests.conftest import FIXTURES, SEEDS, SHARED

ORIGINALS = [(FIXTURES, SHARED / "fixtures" / "adyen"), (SEEDS, SHARED / "seeds")]


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared/ is not beside this checkout")
@pytest.mark.parametrize("copies,originals", ORIGINALS, ids=["adyen", "guide"])
def test_copies_match_the_originals(copies, originals):
    copied = sorted(p.name for p in copies.iterdir() if p.is_file())
    assert copied, f"no fixtures in {copies}"
    for name in copied:
        assert (copies / name).read_bytes() == (originals / name).read_bytes(), name
    if originals.name == "adyen":  # every vendor fixture is kept, not only some
        assert copied == sorted(p.name for p in originals.iterdir() if p.is_file())
