"""The USB transport through the real pyusb code paths, over a simulated device.

usb.core.find(backend=...) gets the simulated backend of tests/usb_sim.py; everything above
it (pyusb's Device/Configuration/Interface/Endpoint, find_descriptor, get_string, claiming,
transfers, clear_halt, and the transport itself) is the real code. The end-to-end tests run
the terminal worker, the `length-prefixed` framer, a real SQLite journal and the simulated
terminal logic behind the USB device. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import usb.backend.libusb0
import usb.backend.libusb1
import usb.backend.openusb
import usb.core
import usb.util

from bridge.config import TerminalConfig, UsbLink
from bridge.daemon.journal import Journal
from bridge.daemon.worker import TerminalWorker
from bridge.protocol.framing import FrameReceived, make_framer
from bridge.protocol.messages import parse_message
from bridge.protocol.transaction import TxKey, TxState, request_digest
from bridge.simulator import responses
from bridge.simulator.terminal import Behaviour, Scenario
from bridge.transports import Backoff, LinkClosed, open_transport
from bridge.transports.usb import STALL_RETRIES, UsbTransport

from .test_terminal_worker import POI, RecordingOutlet, scenario
from .usb_sim import (
    ENDPOINT_IN,
    ENDPOINT_OUT,
    LIBUSB_ERROR_IO,
    SimBackend,
    SimDevice,
    TerminalBehindUsb,
)

STEP = 5.0  # upper bound for one step; real steps take milliseconds
SERIAL = "324688179"
WHO = f"USB terminal 0b00:0084 serial {SERIAL}"


def usb_link(**fields) -> UsbLink:
    return UsbLink(**{"vendor_id": "0x0b00", "product_id": "0x0084", "timeout": 0.5,
                      **fields})


async def eventually(condition, timeout: float = STEP) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def take_out(device: SimDevice, size: int) -> bytes:
    """What the host wrote, once `size` bytes are there (or the step's time is up)."""
    return await asyncio.to_thread(device.take_out, STEP, size)


async def read_exactly(transport: UsbTransport, size: int) -> tuple[bytes, int]:
    got, reads = b"", 0
    async with asyncio.timeout(STEP):
        while len(got) < size:
            got += await transport.read()
            reads += 1
    return got, reads


@pytest.fixture
def device() -> SimDevice:
    return SimDevice(serial=SERIAL)


@pytest.fixture
async def transport(device):
    link = usb_link()
    usb_transport = UsbTransport(link, backend=SimBackend(device))
    async with asyncio.timeout(STEP):
        await usb_transport.open()
    yield usb_transport
    async with asyncio.timeout(STEP):
        await usb_transport.close()


# --- opening and closing --------------------------------------------------------------------


async def test_open_detaches_the_kernel_driver_claims_and_close_gives_it_back(device):
    usb_transport = UsbTransport(usb_link(serial=SERIAL), backend=SimBackend(device))
    assert usb_transport.kind == "usb" and not usb_transport.is_open
    await usb_transport.open()
    assert usb_transport.is_open
    assert device.events[-2:] == ["detach", "claim"]  # the driver goes before the claim
    assert not device.kernel_driver_active
    assert usb_transport.describe() == f"usb 0b00:0084 serial {SERIAL} interface 0"

    await usb_transport.close()
    assert not usb_transport.is_open
    # Released before the driver is re-attached (it cannot bind a claimed interface), and the
    # handle is closed last.
    assert device.events[-3:] == ["release", "attach", "close"]
    assert device.kernel_driver_active and device.open_handles == 0
    events = list(device.events)
    await usb_transport.close()  # twice: nothing more happens
    assert device.events == events
    with pytest.raises(LinkClosed, match=f"{WHO} was closed"):
        await usb_transport.read()


async def test_describe_names_the_serial_found_when_none_is_configured(transport):
    assert transport.link.serial is None
    assert transport.describe() == f"usb 0b00:0084 serial {SERIAL} interface 0"


async def test_an_unconfigured_device_is_configured_before_claiming():
    device = SimDevice(configured=False, kernel_driver=False)
    usb_transport = UsbTransport(usb_link(), backend=SimBackend(device))
    await usb_transport.open()
    assert "detach" not in device.events
    assert device.events[-2:] == ["set_configuration 1", "claim"]
    await usb_transport.close()
    assert "attach" not in device.events  # there was no driver to give back


async def test_close_while_a_read_waits_then_reopen(device, transport):
    reader = asyncio.create_task(transport.read())
    await asyncio.sleep(0.05)
    async with asyncio.timeout(STEP):
        await transport.close()
    with pytest.raises(LinkClosed, match="was closed"):
        async with asyncio.timeout(STEP):
            await reader
    await transport.close()
    assert device.open_handles == 0 and device.claimed_by is None

    await transport.open()  # the same transport opens again, as the worker's reopen does
    device.send(b'{"again":1}')
    assert (await read_exactly(transport, 11))[0] == b'{"again":1}'
    assert device.count("detach") == 2 and device.count("claim") == 2


# --- moving bytes ---------------------------------------------------------------------------


async def test_bytes_both_ways(device, transport):
    await transport.write(b'{"to":"terminal"}')
    assert await take_out(device, 17) == b'{"to":"terminal"}'
    device.send(b'{"to":"bridge"}')
    assert (await read_exactly(transport, 15))[0] == b'{"to":"bridge"}'


@pytest.mark.parametrize("accept_per_write", [None, 1000])
async def test_an_11_kb_message_each_way_in_many_packets(device, transport, accept_per_write):
    """accept_per_write makes the device take at most that much per transfer (short writes,
    as libusb reports a transfer that timed out part way): write() still sends everything."""
    device.accept_per_write = accept_per_write
    payload = b'{"receipt":"' + b"0123456789abcdef" * 720 + b'"}'
    frame = make_framer("length-prefixed").encode(payload)
    assert len(frame) > 11 * 1024
    await transport.write(frame)
    assert await take_out(device, len(frame)) == frame
    step = accept_per_write or len(frame)
    transfers = [min(step, len(frame) - start) for start in range(0, len(frame), step)]
    assert device.out_transfers == len(transfers)  # 1, or 12 after short writes
    assert device.out_packets == sum(-(-size // device.max_packet) for size in transfers)

    device.send(frame)
    got, reads = await read_exactly(transport, len(frame))
    assert got == frame
    assert reads == 1  # one transfer of whole packets, ended by the short last one
    assert device.in_packets == len(frame) // device.max_packet + 1


async def test_back_to_back_transfers_are_read_separately(device, transport):
    device.send(b"{first}")
    device.send(b"{second}")
    assert await transport.read() == b"{first}"
    assert await transport.read() == b"{second}"


async def test_a_waiting_read_does_not_block_the_event_loop(transport):
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    reader = asyncio.create_task(transport.read())
    await asyncio.sleep(0.6)  # longer than one read transfer's timeout
    assert not reader.done()
    assert ticks >= 30
    ticking.cancel()
    reader.cancel()


async def test_a_cancelled_read_does_not_lose_the_bytes_in_flight(device, transport):
    reader = asyncio.create_task(transport.read())
    await asyncio.sleep(0.05)  # the bulk transfer is waiting in the transport's thread
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    device.send(b'{"late":true}')
    assert (await read_exactly(transport, 13))[0] == b'{"late":true}'


# --- picking the device --------------------------------------------------------------------


async def test_the_serial_number_selects_one_of_two_terminals():
    first = SimDevice(serial="AAA111", address=5)
    second = SimDevice(serial="BBB222", address=6)
    usb_transport = UsbTransport(usb_link(serial="BBB222"), backend=SimBackend(first, second))
    await usb_transport.open()
    assert "claim" in second.events and "claim" not in first.events
    assert first.open_handles == 0  # reading its serial number opened it; it was closed again
    await usb_transport.write(b"{}")
    assert await take_out(second, 2) == b"{}"
    assert first.take_out() == b""
    await usb_transport.close()


@pytest.mark.parametrize("configured", ["V400m 324688179  ", "V400m_324688179"])
async def test_a_serial_number_as_udev_writes_it_selects_the_terminal(configured):
    """The device reports its serial space-padded; udev (`poi-bridge devices`, the matcher)
    calls it "V400m_324688179". Either spelling in the configuration opens that terminal."""
    device = SimDevice(serial="V400m 324688179  ")
    usb_transport = UsbTransport(usb_link(serial=configured),
                                 backend=SimBackend(SimDevice(serial="AAA111", address=4),
                                                    device))
    await usb_transport.open()
    try:
        assert "claim" in device.events
    finally:
        await usb_transport.close()


async def test_two_terminals_and_no_serial_configured_is_refused_naming_both():
    backend = SimBackend(SimDevice(serial="AAA111", address=5),
                         SimDevice(serial="BBB222", address=6))
    with pytest.raises(LinkClosed) as caught:
        await UsbTransport(usb_link(), backend=backend).open()
    reason = caught.value.reason
    assert "2 USB terminals 0b00:0084 are connected" in reason
    assert "serial AAA111" in reason and "serial BBB222" in reason
    assert "set `serial`" in reason
    assert all(d.open_handles == 0 and "claim" not in d.events for d in backend.devices)


async def test_a_terminal_without_serial_never_takes_a_twins_device():
    """Two terminals of one model: V400m-1 configured with serial AAA111, V400m-2 without.
    With V400m-2's own device unplugged, V400m-2 used to open the only device there, its
    twin's: it held the interface, and V400m-1 could not open its own device (nor was it
    followed there: the links may lead to one device). With both plugged in it was refused
    outright. It now takes only a device no other terminal is configured with."""
    twin = SimDevice(serial="AAA111", address=5)
    with pytest.raises(LinkClosed) as caught:
        await UsbTransport(usb_link(), backend=SimBackend(twin),
                           taken_serials=["AAA111"]).open()
    assert "has serial AAA111, which the configuration gives another terminal" in \
        caught.value.reason
    assert "claim" not in twin.events and twin.open_handles == 0
    own = SimDevice(serial="BBB222", address=6)
    transport = UsbTransport(usb_link(), backend=SimBackend(twin, own),
                             taken_serials=["AAA111"])
    await transport.open()
    try:
        assert "claim" in own.events and "claim" not in twin.events
    finally:
        await transport.close()


async def test_a_device_whose_serial_cannot_be_read_is_not_taken_beside_a_twin():
    """The review of the late commits: a device whose serial number could not be read (a
    stalled control request) counted as no other terminal's, so a link without serial
    could still take its twin's device. Beside a twin configured by serial it is not
    opened (tried again later); with no twin configured, it is, as before."""
    def unreadable() -> SimDevice:
        device = SimDevice(serial="AAA111", address=5)
        del device.strings[3]  # it has a serial number, which does not read
        return device

    twin = unreadable()
    with pytest.raises(LinkClosed) as caught:
        await UsbTransport(usb_link(), backend=SimBackend(twin),
                           taken_serials=["AAA111"]).open()
    assert "does not let its serial number be read" in caught.value.reason, caught.value.reason
    assert "claim" not in twin.events
    alone = unreadable()
    transport = UsbTransport(usb_link(), backend=SimBackend(alone))
    await transport.open()
    try:
        assert "claim" in alone.events
    finally:
        await transport.close()


def twin(port: tuple[int, ...] | None, address: int) -> SimDevice:
    """A terminal of the model that reports no serial number, plugged into `port` of bus 1."""
    return SimDevice(serial=None, address=address, port_numbers=port)


async def test_twins_without_serial_numbers_are_told_apart_by_port():
    """Two terminals of one model that report no serial number: each was refused with
    "set `serial`", which they cannot be. Configured by port, each opens its own."""
    left, right = twin((1, 4), 4), twin((1, 5), 5)
    backend = SimBackend(left, right)
    for port, own, other in (("1-1.4", left, right), ("1-1.5", right, left)):
        transport = UsbTransport(usb_link(port=port), backend=backend)
        await transport.open()
        try:
            assert own.claimed_by is not None and other.claimed_by is None
            assert f"port {port}" in transport.describe()
        finally:
            await transport.close()


async def test_twins_without_serial_numbers_are_refused_naming_their_ports():
    """The refusal offers `port`, and names each device's port path to copy into it."""
    backend = SimBackend(twin((1, 4), 4), twin((1, 5), 5))
    with pytest.raises(LinkClosed) as caught:
        await UsbTransport(usb_link(), backend=backend).open()
    reason = caught.value.reason
    assert "2 USB terminals 0b00:0084 are connected" in reason
    assert "port 1-1.4" in reason and "port 1-1.5" in reason, reason
    assert "`port`" in reason, reason
    assert all(d.open_handles == 0 and "claim" not in d.events for d in backend.devices)


async def test_a_terminal_configured_by_port_is_not_connected_when_its_port_is_empty():
    """Nothing at its port: the twin at another port is not taken, and the message says where
    the devices are. A backend that cannot tell a device's port is no crash: unknown."""
    other, unknown = twin((1, 5), 5), twin(None, 6)
    with pytest.raises(LinkClosed) as caught:
        await UsbTransport(usb_link(port="1-1.4"), backend=SimBackend(other, unknown)).open()
    reason = caught.value.reason
    assert "plugged into port 1-1.4" in reason and "port 1-1.5" in reason, reason
    assert "bus 1 address 6, port unknown" in reason, reason
    assert "claim" not in other.events and "claim" not in unknown.events


async def test_port_and_serial_configured_both_must_match():
    at_port = SimDevice(serial="AAA111", address=4, port_numbers=(1, 4))
    elsewhere = SimDevice(serial="BBB222", address=5, port_numbers=(1, 5))
    backend = SimBackend(at_port, elsewhere)
    with pytest.raises(LinkClosed) as caught:
        await UsbTransport(usb_link(port="1-1.4", serial="BBB222"), backend=backend).open()
    assert "serial AAA111 (port 1-1.4)" in caught.value.reason, caught.value.reason
    assert "claim" not in elsewhere.events and "claim" not in at_port.events
    transport = UsbTransport(usb_link(port="1-1.4", serial="AAA111"), backend=backend)
    await transport.open()
    try:
        assert "claim" in at_port.events
    finally:
        await transport.close()


async def test_a_terminal_without_serial_or_port_never_takes_the_device_at_a_twins_port():
    """As with a twin's serial: the device at another terminal's configured port is that
    terminal's, and holding its interface would keep that terminal offline."""
    theirs = twin((1, 4), 4)
    with pytest.raises(LinkClosed) as caught:
        await UsbTransport(usb_link(), backend=SimBackend(theirs),
                           taken_ports=["1-1.4"]).open()
    assert "is at port 1-1.4, which the configuration gives another terminal" in \
        caught.value.reason, caught.value.reason
    assert "claim" not in theirs.events
    own = twin((1, 5), 5)
    transport = UsbTransport(usb_link(), backend=SimBackend(theirs, own),
                             taken_ports=["1-1.4"])
    await transport.open()
    try:
        assert "claim" in own.events and "claim" not in theirs.events
    finally:
        await transport.close()


def test_a_backend_that_cannot_say_the_port_is_an_unknown_port_not_a_crash():
    from bridge.transports.usb import _port_path

    class Refusing:
        bus, address = 1, 4

        @property
        def port_numbers(self):
            raise NotImplementedError("LIBUSB_ERROR_NOT_SUPPORTED")

    assert _port_path(Refusing()) is None
    assert _port_path(type("Old", (), {"bus": 1, "address": 4})()) is None  # no such attribute
    assert _port_path(type("Hub", (), {"bus": 2, "port_numbers": None})()) is None
    assert _port_path(type("Deep", (), {"bus": 2, "port_numbers": (3, 1, 2)})()) == "2-3.1.2"


@pytest.mark.parametrize("port", ["1", "1-", "-1", "1-1.", "1-1:1.0", "usb1", " 1-1", "1-a", ""])
def test_a_port_that_is_not_a_usb_port_path_is_a_config_error(port):
    from bridge.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"terminals\[0\]\.link\.port: .*not a USB port "
                                          r"path.*1-1\.4"):
        parse_config({"terminals": [{"poi_id": "V400m-1", "link": {
            "kind": "usb", "vendor_id": "0x0b00", "product_id": "0x0084", "port": port}}]})
    assert usb_link(port="3-10.2.1").port == "3-10.2.1"


def test_the_daemon_tells_a_usb_terminal_without_serial_its_twins_serials_and_ports(tmp_path):
    from bridge.config import parse_config
    from bridge.daemon.app import Bridge

    usb = {"kind": "usb", "vendor_id": "0x0b00", "product_id": "0x0084"}
    bridge = Bridge(parse_config({
        "journal": str(tmp_path / "journal.sqlite3"),
        "terminals": [{"poi_id": "V400m-1", "link": {**usb, "serial": "AAA111"}},
                      {"poi_id": "V400m-2", "link": usb},
                      {"poi_id": "V400m-3", "link": {**usb, "product_id": "0x0080",
                                                     "serial": "CCC333"}},
                      # another interface of one composite device: not a twin
                      {"poi_id": "V400m-4", "link": {**usb, "interface": 1,
                                                     "serial": "DDD444"}},
                      {"poi_id": "V400m-5", "link": {**usb, "port": "1-1.4"}},
                      {"poi_id": "V400m-6", "link": {**usb, "interface": 1,
                                                     "port": "1-1.5"}}]}), hotplug=False)
    try:
        worker = bridge.workers["V400m-2"]
        transport = worker._transport_factory(worker.config.link)
        assert (transport.taken_serials, transport.taken_ports) == (("AAA111",), ("1-1.4",))
    finally:
        bridge.journal.close()


async def test_a_wrong_serial_says_which_ones_are_there():
    backend = SimBackend(SimDevice(serial="AAA111"))
    with pytest.raises(LinkClosed) as caught:
        await UsbTransport(usb_link(serial="ZZZ999"), backend=backend).open()
    assert caught.value.reason.startswith("USB terminal 0b00:0084 serial ZZZ999 is not connected")
    assert "serial AAA111" in caught.value.reason


async def test_no_device_present():
    other = SimDevice(vendor_id=0x11CA, product_id=0x0219)  # another vendor's terminal
    with pytest.raises(LinkClosed, match=r"^USB terminal 0b00:0084 serial 1 is not connected "
                                         r"\(unplugged, switched off"):
        await UsbTransport(usb_link(serial="1"), backend=SimBackend(other)).open()
    with pytest.raises(LinkClosed, match="not connected"):
        await UsbTransport(usb_link(), backend=SimBackend()).open()


async def test_permission_denied_points_at_the_udev_rules():
    device = SimDevice(accessible=False)
    with pytest.raises(LinkClosed, match=r"permission denied opening USB terminal 0b00:0084.*"
                                         r"udev rules"):
        await UsbTransport(usb_link(), backend=SimBackend(device)).open()


async def test_permission_denied_with_a_serial_configured_is_not_called_unplugged():
    """The serial number cannot be read without access to the device: the technician is
    told to install the udev rules, not that the terminal is not connected."""
    backend = SimBackend(SimDevice(serial=SERIAL, accessible=False))
    with pytest.raises(LinkClosed) as caught:
        await UsbTransport(usb_link(serial=SERIAL), backend=backend).open()
    reason = caught.value.reason
    assert reason.startswith("permission denied reading the serial number of USB terminal(s) "
                             "0b00:0084 (bus 1 address 5, port 1-1: no permission)"), reason
    assert "install the udev rules" in reason
    assert "not connected" not in reason and "wrong serial" not in reason


class UnplugsWhileItsSerialIsRead(SimBackend):
    """The cable is pulled just as the bridge asks the device for its serial number."""

    def ctrl_transfer(self, dev_handle, *args):
        dev_handle.device.unplug()
        return super().ctrl_transfer(dev_handle, *args)


async def test_a_terminal_unplugged_while_its_serial_is_read_is_not_a_permission_problem():
    device = SimDevice(serial=SERIAL)
    with pytest.raises(LinkClosed) as caught:
        await UsbTransport(usb_link(serial=SERIAL),
                           backend=UnplugsWhileItsSerialIsRead(device)).open()
    assert caught.value.reason == f"{WHO} is not connected (unplugged while it was being opened)"
    assert device.open_handles == 0


async def test_a_missing_interface_is_named(device):
    with pytest.raises(LinkClosed, match=r"has no interface 2 \(it has 0\); check `interface`"):
        await UsbTransport(usb_link(interface=2), backend=SimBackend(device)).open()
    assert device.open_handles == 0
    assert device.kernel_driver_active  # nothing was detached for a failed open


async def test_without_libusb_the_error_says_so():
    if any(m.get_backend() is not None
           for m in (usb.backend.libusb1, usb.backend.libusb0, usb.backend.openusb)):
        pytest.skip("a libusb is installed here, so pyusb's default backend exists")
    usb_transport = open_transport(usb_link())
    assert isinstance(usb_transport, UsbTransport) and usb_transport.backend is None
    with pytest.raises(LinkClosed, match="libusb-1.0 is not installed"):
        await usb_transport.open()


# --- stalls, unplugs, a hung terminal -----------------------------------------------------------


async def test_a_stall_on_write_is_cleared_and_retried_transparently(device, transport):
    device.stall_next_write()
    await transport.write(b'{"n":1}')
    assert await take_out(device, 7) == b'{"n":1}'  # exactly once
    assert f"clear_halt 0x{ENDPOINT_OUT:02x}" in device.events
    assert transport.is_open


async def test_a_stall_on_read_is_cleared_and_retried_transparently(device, transport):
    device.stall_next_read()
    device.send(b'{"n":2}')
    assert (await read_exactly(transport, 7))[0] == b'{"n":2}'
    assert f"clear_halt 0x{ENDPOINT_IN:02x}" in device.events


async def test_an_endpoint_that_keeps_stalling_closes_the_link(device, transport):
    device.stall_next_write(times=STALL_RETRIES + 1)
    with pytest.raises(LinkClosed, match=f"{WHO} keeps stalling its bulk OUT endpoint 0x01 "
                                         f"\\(cleared {STALL_RETRIES} times\\)"):
        await transport.write(b"{}")
    assert device.count("clear_halt 0x01") == STALL_RETRIES
    assert not transport.is_open


async def test_unplug_during_a_read_closes_the_link_with_the_reason(device, transport):
    reader = asyncio.create_task(transport.read())
    await asyncio.sleep(0.05)
    started = time.monotonic()
    device.unplug()
    with pytest.raises(LinkClosed) as caught:
        async with asyncio.timeout(STEP):
            await reader
    assert caught.value.reason == f"{WHO} disappeared (unplugged?)"
    assert time.monotonic() - started < 0.2  # at once, not after a read timeout
    assert not transport.is_open
    with pytest.raises(LinkClosed, match="disappeared"):
        await transport.write(b"{}")
    await transport.close()
    await transport.close()
    assert device.open_handles == 0
    with pytest.raises(LinkClosed, match="disappeared"):  # the reason stays after close
        await transport.read()


async def test_a_bus_error_is_not_called_an_unplug(device, transport):
    """libusb's IO error on a transfer is the bus's (CRC, babble: a bad cable, a terminal
    resetting); an unplug is NO_DEVICE. The device is still there and opens again."""
    device.fail_next_read(LIBUSB_ERROR_IO)
    with pytest.raises(LinkClosed) as caught:
        async with asyncio.timeout(STEP):
            await transport.read()
    assert caught.value.reason == (f"USB I/O error on {WHO} bulk IN endpoint 0x81 (if it "
                                   f"repeats: a loose or bad USB cable, or the terminal "
                                   f"resetting)")
    await transport.close()
    await transport.open()
    device.send(b"{}")
    assert (await read_exactly(transport, 2))[0] == b"{}"


async def test_unplug_during_a_blocked_write(device, transport):
    device.accepting = False  # the write waits in the transport's thread
    writer = asyncio.create_task(transport.write(b'{"x":1}'))
    await asyncio.sleep(0.05)
    device.unplug()
    with pytest.raises(LinkClosed, match=f"^{WHO} disappeared"):
        async with asyncio.timeout(STEP):
            await writer


async def test_a_terminal_that_takes_no_data_closes_the_link(device):
    usb_transport = UsbTransport(usb_link(timeout=0.05), backend=SimBackend(device))
    await usb_transport.open()
    device.accepting = False
    with pytest.raises(LinkClosed, match=f"{WHO} is not taking data: 3 writes in a row"):
        async with asyncio.timeout(STEP):
            await usb_transport.write(b"{}")
    await usb_transport.close()
    assert device.kernel_driver_active and device.open_handles == 0


async def test_a_close_waits_out_the_write_in_flight_and_the_next_open_finds_it_free(device):
    """A link ended while a frame was being written (a relink, the daemon stopping) holds
    its interface until that transfer times out (`timeout`, up to 60 s). close() gave up
    after 5 s with the interface still claimed, and the next transport's open failed "in
    use by another program (a second poi-bridge?)" (the transports audit)."""
    link = usb_link(timeout=5.5)
    old = UsbTransport(link, backend=SimBackend(device))
    await old.open()
    device.accepting = False
    writer = asyncio.create_task(old.write(b'{"SaleToPOIRequest":{}}'))
    await asyncio.sleep(0.1)
    writer.cancel()  # as the worker cancels its writer task, then closes
    async with asyncio.timeout(link.timeout + 3):
        await old.close()
    assert device.claimed_by is None and device.open_handles == 0
    new = UsbTransport(link, backend=SimBackend(device))
    await new.open()
    device.accepting = True
    await new.close()


async def test_opening_a_replugged_terminal(device):
    usb_transport = UsbTransport(usb_link(), backend=SimBackend(device))
    await usb_transport.open()
    device.unplug()
    with pytest.raises(LinkClosed, match="disappeared"):
        await usb_transport.read()
    await usb_transport.close()
    with pytest.raises(LinkClosed, match="not connected"):
        await usb_transport.open()
    device.replug()
    await usb_transport.open()
    assert usb_transport.is_open and device.count("claim") == 2
    device.send(b"{}")
    assert await usb_transport.read() == b"{}"
    await usb_transport.close()


# --- end to end: the terminal worker over USB -------------------------------------------------


class UsbRig:
    """A TerminalWorker on a USB link to the simulated terminal behind a SimDevice."""

    def __init__(self, tmp_path: Path, sim: Scenario, **timing) -> None:
        self.device = SimDevice(serial=SERIAL)
        self.backend = SimBackend(self.device)
        self.terminal = TerminalBehindUsb(self.device, sim)
        self.outlet = RecordingOutlet()
        self.journal = Journal(tmp_path / "journal.sqlite3")
        self.config = TerminalConfig.model_validate({
            "poi_id": POI,
            "link": {"kind": "usb", "vendor_id": "0x0b00", "product_id": "0x0084",
                     "serial": SERIAL, "timeout": 0.5},
            "framer": {"name": "length-prefixed"},
            **{"payment_timeout": 1.5, "status_timeout": 0.8, "poll_floor": 0.05,
               "resync_attempts": 2, "reconcile_initial": 0.5, "reconcile_max_interval": 1.0,
               **timing}})
        self.worker = TerminalWorker(
            self.config, self.journal, self.outlet,
            transport_factory=lambda link: UsbTransport(link, backend=self.backend),
            backoff=Backoff(initial=0.05, maximum=0.2))

    async def __aenter__(self) -> UsbRig:
        self.terminal.__enter__()
        await self.worker.start()
        await self.outlet.state_is("online")
        async with asyncio.timeout(10):  # the device has answered the identity check
            while self.worker.identity == "unknown":
                await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc) -> None:
        async with asyncio.timeout(STEP):
            await self.worker.stop()
        self.terminal.__exit__()
        self.journal.close()
        if exc[0] is None:  # do not hide a test's own failure behind this one
            assert self.device.open_handles == 0  # the worker's stop() released the device

    def pay(self, service_id: str, amount: float = 10.0) -> None:
        doc = responses.payment_request("POS1", service_id, POI, amount)
        self.worker.submit(parse_message(doc), doc, request_digest(doc))

    def stored(self, service_id: str):
        return self.journal.get(TxKey("POS1", service_id))

    def entry(self, service_id: str):
        return self.terminal.ledger.get(("POS1", service_id))


async def test_worker_payment_approved_over_usb(tmp_path):
    async with UsbRig(tmp_path, scenario(Behaviour(delay=0.05))) as rig:
        assert rig.worker.state()["link"] == f"usb 0b00:0084 serial {SERIAL} interface 0"
        rig.pay("S1", 12.5)
        result = await rig.outlet.result_for("S1", timeout=STEP)
        assert (result.outcome, result.source) == ("approved", "terminal")
        amounts = result.response["SaleToPOIResponse"]["PaymentResponse"]["PaymentResult"]
        assert amounts["AmountsResp"]["AuthorizedAmount"] == 12.5
        assert rig.stored("S1").state is TxState.FINAL
        assert rig.entry("S1").charged
        # the identity check and its answer, the payment and its answer
        assert (rig.terminal.frames_in, rig.terminal.frames_out) == (2, 2)
        assert rig.worker.counters["frames_in"] == 2


async def test_worker_lost_response_is_recovered_by_status_poll(tmp_path):
    async with UsbRig(tmp_path, scenario(Behaviour(never_answer=True, delay=0.05))) as rig:
        rig.pay("S1", 42.0)
        result = await rig.outlet.result_for("S1", timeout=STEP)
        assert (result.outcome, result.source) == ("approved", "status-poll")
        body = result.response["SaleToPOIResponse"]["PaymentResponse"]["PaymentResult"]
        assert body["AmountsResp"]["AuthorizedAmount"] == 42.0
        assert rig.stored("S1").polls_sent == 1
        # the identity check, the payment once and one status poll: no re-send
        assert rig.terminal.frames_in == 3


async def test_worker_stalls_during_the_exchange_are_recovered(tmp_path):
    async with UsbRig(tmp_path, scenario(Behaviour(delay=0.2))) as rig:
        rig.device.stall_next_write()  # the payment request meets a stalled OUT endpoint
        rig.pay("S1")
        await eventually(lambda: rig.entry("S1") is not None)
        rig.device.stall_next_read()  # and the answer a stalled IN endpoint
        result = await rig.outlet.result_for("S1", timeout=STEP)
        assert (result.outcome, result.source) == ("approved", "terminal")
        assert rig.device.count("clear_halt 0x01") == 1
        assert rig.device.count("clear_halt 0x81") == 1
        assert rig.worker.counters["reconnects"] == 0  # the link never went down
        assert rig.terminal.frames_in == 2  # the identity check and the payment


async def test_worker_unplug_mid_payment_then_replug_resolves_by_status_poll(tmp_path):
    async with UsbRig(tmp_path, scenario(Behaviour(delay=0.4)), status_timeout=3.0) as rig:
        rig.pay("S1")
        await eventually(lambda: rig.entry("S1") is not None)  # the terminal has it...
        rig.device.unplug()  # ...and the cable is pulled before it answers
        rig.worker.device_present(False)  # as the udev monitor reports it
        await rig.outlet.state_is("offline")
        # Whichever the worker noticed first: the failed transfer or the hotplug report.
        assert rig.outlet.states[-1]["detail"] in (f"{WHO} disappeared (unplugged?)",
                                                   "device unplugged")
        # The answer falls due while the cable is out, and is lost with the connection.
        await eventually(lambda: rig.terminal.dropped_answers == 1)
        assert rig.stored("S1").state is not TxState.FINAL

        rig.device.replug()
        rig.worker.device_present(True)
        result = await rig.outlet.result_for("S1", timeout=STEP)
        assert (result.outcome, result.source) == ("approved", "status-poll")
        # no second payment: two identity checks (one per plug-in), the payment, one poll
        assert rig.entry("S1").charged and rig.terminal.frames_in == 4
        assert rig.device.count("detach") == 2 and rig.worker.counters["reconnects"] == 1


async def test_worker_reopens_by_itself_when_the_terminal_drops_off_the_bus(tmp_path):
    """No hotplug events: the terminal resets its USB connection right after taking the
    request, and the worker's backoff keeps trying until the device is back."""
    async with UsbRig(tmp_path, scenario(Behaviour(drop_link=True, delay=0.05)),
                      status_timeout=3.0) as rig:
        rig.pay("S1")
        await rig.outlet.state_is("offline")
        assert rig.outlet.states[-1]["detail"] == f"{WHO} disappeared (unplugged?)"
        result = await rig.outlet.result_for("S1", timeout=STEP)
        assert (result.outcome, result.source) == ("approved", "status-poll")
        assert rig.device.count("replug") == 1
        # no second payment: two identity checks (one per link), the payment, one poll
        assert rig.entry("S1").charged and rig.terminal.frames_in == 4


def test_the_simulated_terminal_frames_its_answers(device):
    """The helper itself: a request written on bulk OUT comes back answered on bulk IN."""
    backend = SimBackend(device)
    dev = usb.core.find(backend=backend, idVendor=0x0B00)
    dev.detach_kernel_driver(0)
    usb.util.claim_interface(dev, 0)
    framer = make_framer("length-prefixed")
    doc = responses.payment_request("POS1", "S9", POI, 3.0)
    with TerminalBehindUsb(device, scenario()) as terminal:
        dev.write(ENDPOINT_OUT, framer.encode(json.dumps(doc).encode()), 1000)
        events = []
        deadline = time.monotonic() + STEP
        while not events and time.monotonic() < deadline:
            try:
                data = dev.read(ENDPOINT_IN, 4096, 100).tobytes()
            except usb.core.USBTimeoutError:
                continue
            events = [e for e in framer.receive_data(data, 0) if isinstance(e, FrameReceived)]
    answer = json.loads(events[0].payload)["SaleToPOIResponse"]
    assert answer["MessageHeader"]["ServiceID"] == "S9"
    assert answer["PaymentResponse"]["Response"]["Result"] == "Success"
    assert terminal.frames_in == 1 and terminal.ledger[("POS1", "S9")].charged
    usb.util.dispose_resources(dev)
