import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Copies kept in the repository, so a clone anywhere runs the tests (see tests/fixtures/README.md);
# test_fixture_copies.py checks them against ../shared when that is beside the checkout.
FIXTURES = ROOT / "tests" / "fixtures" / "adyen"
SEEDS = ROOT / "tests" / "fixtures" / "guide"
SHARED = ROOT.parent / "shared"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"vendor fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture
def mosquitto(tmp_path):
    from tests.broker import Mosquitto

    broker = Mosquitto(tmp_path / "mosquitto").start()
    yield broker
    broker.kill()


@pytest.fixture
def small_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    """A max_frame_size of 4096 taken, below the floor a configuration may set (MIN_FRAME_SIZE,
    32 KiB): an oversize frame is then written at once into a pseudo-terminal, which holds
    about 20 KB unread, as one over the floor could not be. What happens to a frame over
    max_frame_size does not depend on the size."""
    import bridge.config as config_module

    monkeypatch.setattr(config_module, "MIN_FRAME_SIZE", 4096)
