"""A simulated USB payment terminal, behind pyusb's backend interface (usb.backend.IBackend).

pyusb reaches hardware only through its backend, so a backend answering from Python objects
lets the real pyusb code run unchanged on top: usb.core.find, Device, Configuration,
Interface, Endpoint, usb.util.find_descriptor / get_string / claim_interface /
dispose_resources, bulk transfers and clear_halt. It is the one mock these tests allow: the
hardware cannot exist on a test machine (libusb is not even needed).

Errors are raised as pyusb's libusb1 backend raises them: usb.core.USBError(strerror,
libusb error code, errno), and usb.core.USBTimeoutError for LIBUSB_ERROR_TIMEOUT.

The device side models what the transport depends on:
- bulk OUT bytes land in a pipe the test (or `TerminalBehindUsb`) consumes; bulk IN data is
  queued by the device as transfers, cut into wMaxPacketSize packets and ended by a short or
  zero-length packet, so a host read returns at a transfer's end, fills whole packets only,
  and overflows if a packet does not fit (as real hardware does);
- a read with nothing to deliver waits out its timeout, then raises the timeout error;
- unplug() makes every call on an open handle fail with ENODEV (blocked reads wake at once)
  and removes the device from enumeration; replug() brings it back as a new device (new
  address, the kernel driver bound again, old handles still dead);
- stall_next_write()/stall_next_read() halt the endpoint (EPIPE) until clear_halt;
- a kernel driver bound to the interface blocks claiming and configuring until detached;
  detach/attach and the other steps are recorded in `events` for tests to check.
"""

from __future__ import annotations

import array
import errno
import heapq
import itertools
import json
import threading
import time
from collections import deque
from typing import Any

import usb.backend
import usb.core
import usb.util

from bridge.protocol.framing import FrameReceived, make_framer
from bridge.simulator.terminal import Answer, Scenario, SimulatedTerminal

# libusb-1.0 error codes and what pyusb's libusb1 backend makes of them.
LIBUSB_ERROR_IO = -1
LIBUSB_ERROR_INVALID_PARAM = -2
LIBUSB_ERROR_ACCESS = -3
LIBUSB_ERROR_NO_DEVICE = -4
LIBUSB_ERROR_NOT_FOUND = -5
LIBUSB_ERROR_BUSY = -6
LIBUSB_ERROR_TIMEOUT = -7
LIBUSB_ERROR_OVERFLOW = -8
LIBUSB_ERROR_PIPE = -9

_ERRORS = {
    LIBUSB_ERROR_IO: ("Input/Output Error", errno.EIO),
    LIBUSB_ERROR_INVALID_PARAM: ("Invalid parameter", errno.EINVAL),
    LIBUSB_ERROR_ACCESS: ("Access denied (insufficient permissions)", errno.EACCES),
    LIBUSB_ERROR_NO_DEVICE: ("No such device (it may have been disconnected)", errno.ENODEV),
    LIBUSB_ERROR_NOT_FOUND: ("Entity not found", errno.ENOENT),
    LIBUSB_ERROR_BUSY: ("Resource busy", errno.EBUSY),
    LIBUSB_ERROR_TIMEOUT: ("Operation timed out", errno.ETIMEDOUT),
    LIBUSB_ERROR_OVERFLOW: ("Overflow", errno.EOVERFLOW),
    LIBUSB_ERROR_PIPE: ("Pipe error", errno.EPIPE),
}


def usb_error(code: int) -> usb.core.USBError:
    strerror, number = _ERRORS[code]
    cls = usb.core.USBTimeoutError if code == LIBUSB_ERROR_TIMEOUT else usb.core.USBError
    return cls(strerror, code, number)


class Descriptor:
    """A descriptor as pyusb reads it: fields as attributes."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def __repr__(self) -> str:
        return f"Descriptor({self.__dict__})"


ENDPOINT_OUT = 0x01
ENDPOINT_IN = 0x81
ENDPOINT_NOTIFY = 0x82  # an interrupt IN endpoint listed first: the transport must skip it
BULK, INTERRUPT = 0x02, 0x03
LANGID_EN_US = 0x0409


class SimDevice:
    """One simulated terminal with one vendor-specific interface. Thread-safe: the host side
    (pyusb, in the transport's threads) and the device side (the test, or a terminal thread)
    meet under one condition variable."""

    def __init__(self, *, vendor_id: int = 0x0B00, product_id: int = 0x0084,
                 serial: str | None = "324688179", manufacturer: str = "Ingenico",
                 product: str = "Move/5000", bus: int = 1, address: int = 5,
                 interface: int = 0, max_packet: int = 64, kernel_driver: bool = True,
                 configured: bool = True, accessible: bool = True,
                 port_numbers: tuple[int, ...] | None = (1,)) -> None:
        """`port_numbers`: the hub ports from the root to the device, as libusb gives them
        (bus 1 and (1, 4) is the kernel's 1-1.4); None as a backend that cannot say."""
        self.vendor_id, self.product_id = vendor_id, product_id
        self.serial = serial
        self.strings = {1: manufacturer, 2: product}
        if serial is not None:
            self.strings[3] = serial
        self.bus, self.address = bus, address
        self.port_numbers = port_numbers
        self.interface = interface
        self.max_packet = max_packet
        self.accessible = accessible  # False: opening it fails with EACCES (no udev rule)
        self._initial = (configured, kernel_driver)
        self.cond = threading.Condition()
        self.present = True
        self.generation = 1  # a replug makes a new device: handles of older ones are dead
        self.events: list[str] = []
        self.open_handles = 0
        self.accept_per_write: int | None = None  # short writes: take at most this per transfer
        self.accepting = True  # False: bulk OUT transfers time out (the terminal is hung)
        self._reset()

    def _reset(self) -> None:
        configured, kernel_driver = self._initial
        self.configuration = 1 if configured else 0
        self.kernel_driver_active = kernel_driver
        self.claimed_by: _Handle | None = None
        self.halted: set[int] = set()
        self._stall_writes = self._stall_reads = 0
        self._fail_writes: deque[int] = deque()  # libusb error codes for the next OUT transfers
        self._fail_reads: deque[int] = deque()
        self._out = bytearray()
        self._in: deque[bytes] = deque()  # packets, b"" for a zero-length packet
        self.out_packets = 0
        self.out_transfers = 0
        self.in_packets = 0

    # --- the device side ------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """The terminal sends one transfer on bulk IN."""
        size = self.max_packet
        with self.cond:
            if not self.present:
                return
            self._in.extend(data[i:i + size] for i in range(0, len(data), size))
            if len(data) % size == 0:
                self._in.append(b"")  # a zero-length packet ends a transfer of whole packets
            self.cond.notify_all()

    def take_out(self, timeout: float = 0.0, size: int = 1) -> bytes:
        """Everything the host has written so far, waiting up to `timeout` for `size` bytes."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self._out) < size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.cond.wait(remaining)
            data = bytes(self._out)
            self._out.clear()
            return data

    def stall_next_write(self, times: int = 1) -> None:
        with self.cond:
            self._stall_writes += times

    def stall_next_read(self, times: int = 1) -> None:
        with self.cond:
            self._stall_reads += times
            self.cond.notify_all()

    def fail_next_write(self, code: int, times: int = 1) -> None:
        """The next `times` bulk OUT transfers fail with libusb error `code`, taking nothing."""
        with self.cond:
            self._fail_writes.extend([code] * times)

    def fail_next_read(self, code: int, times: int = 1) -> None:
        """The next `times` bulk IN transfers (one waiting now included) fail with `code`."""
        with self.cond:
            self._fail_reads.extend([code] * times)
            self.cond.notify_all()

    def unplug(self) -> None:
        with self.cond:
            self.present = False
            self.events.append("unplug")
            self._reset()
            self.cond.notify_all()  # blocked transfers fail at once, as libusb's do

    def replug(self) -> None:
        with self.cond:
            self.generation += 1
            self.address += 1  # the hub gives a replugged device a new address
            self._reset()
            self.present = True
            self.events.append("replug")
            self.cond.notify_all()

    def count(self, event: str) -> int:
        return self.events.count(event)

    # --- descriptors ----------------------------------------------------------------------

    def device_descriptor(self, address: int) -> Descriptor:
        return Descriptor(
            bLength=18, bDescriptorType=0x01, bcdUSB=0x0200, bDeviceClass=0,
            bDeviceSubClass=0, bDeviceProtocol=0, bMaxPacketSize0=64,
            idVendor=self.vendor_id, idProduct=self.product_id, bcdDevice=0x0100,
            iManufacturer=1, iProduct=2, iSerialNumber=3 if self.serial is not None else 0,
            bNumConfigurations=1, bus=self.bus, address=address,
            port_number=self.port_numbers[-1] if self.port_numbers else None,
            port_numbers=self.port_numbers, speed=usb.util.SPEED_FULL)

    def config_descriptor(self) -> Descriptor:
        return Descriptor(
            bLength=9, bDescriptorType=0x02, wTotalLength=9 + 9 + 3 * 7, bNumInterfaces=1,
            bConfigurationValue=1, iConfiguration=0, bmAttributes=0x80, bMaxPower=50,
            extra_descriptors=[])

    def interface_descriptor(self) -> Descriptor:
        return Descriptor(
            bLength=9, bDescriptorType=0x04, bInterfaceNumber=self.interface,
            bAlternateSetting=0, bNumEndpoints=3, bInterfaceClass=0xFF,
            bInterfaceSubClass=0, bInterfaceProtocol=0, iInterface=0, extra_descriptors=[])

    def endpoint_descriptors(self) -> list[Descriptor]:
        def endpoint(address: int, kind: int, size: int, interval: int) -> Descriptor:
            return Descriptor(bLength=7, bDescriptorType=0x05, bEndpointAddress=address,
                              bmAttributes=kind, wMaxPacketSize=size, bInterval=interval,
                              bRefresh=0, bSynchAddress=0, extra_descriptors=[])
        return [endpoint(ENDPOINT_NOTIFY, INTERRUPT, 8, 10),
                endpoint(ENDPOINT_IN, BULK, self.max_packet, 0),
                endpoint(ENDPOINT_OUT, BULK, self.max_packet, 0)]

    def string_descriptor(self, index: int) -> bytes | None:
        if index == 0:
            return bytes([4, 0x03]) + LANGID_EN_US.to_bytes(2, "little")
        text = self.strings.get(index)
        if text is None:
            return None
        encoded = text.encode("utf-16-le")
        return bytes([2 + len(encoded), 0x03]) + encoded


class _DevRef:
    """What enumerate_devices yields: one device as it was when enumerated."""

    def __init__(self, device: SimDevice) -> None:
        self.device = device
        self.generation = device.generation
        self.address = device.address


class _Handle:
    def __init__(self, device: SimDevice, generation: int) -> None:
        self.device = device
        self.generation = generation
        self.closed = False


class SimBackend(usb.backend.IBackend):
    """pyusb backend over SimDevice objects; pass it as usb.core.find(backend=...)."""

    def __init__(self, *devices: SimDevice) -> None:
        super().__init__()
        self.devices = list(devices)

    # --- enumeration and descriptors ------------------------------------------------------

    def enumerate_devices(self):
        return [_DevRef(d) for d in self.devices if d.present]

    def get_parent(self, dev):
        return None

    def get_device_descriptor(self, dev):
        return dev.device.device_descriptor(dev.address)

    def get_configuration_descriptor(self, dev, config):
        if config != 0:
            raise IndexError(f"Invalid configuration index {config}")
        return dev.device.config_descriptor()

    def get_interface_descriptor(self, dev, intf, alt, config):
        self.get_configuration_descriptor(dev, config)
        if intf != 0:
            raise IndexError(f"Invalid interface index {intf}")
        if alt != 0:  # Configuration.__iter__ walks alternate settings until IndexError
            raise IndexError(f"Invalid alternate setting index {alt}")
        return dev.device.interface_descriptor()

    def get_endpoint_descriptor(self, dev, ep, intf, alt, config):
        self.get_interface_descriptor(dev, intf, alt, config)
        endpoints = dev.device.endpoint_descriptors()
        if not 0 <= ep < len(endpoints):
            raise IndexError(f"Invalid endpoint index {ep}")
        return endpoints[ep]

    # --- handles --------------------------------------------------------------------------

    def open_device(self, dev):
        device = dev.device
        with device.cond:
            if not device.present or dev.generation != device.generation:
                raise usb_error(LIBUSB_ERROR_NO_DEVICE)
            if not device.accessible:
                raise usb_error(LIBUSB_ERROR_ACCESS)
            device.open_handles += 1
            device.events.append("open")
            return _Handle(device, device.generation)

    def close_device(self, dev_handle):
        device = dev_handle.device
        with device.cond:
            if not dev_handle.closed:
                dev_handle.closed = True
                device.open_handles -= 1
                device.events.append("close")

    def _alive(self, handle: _Handle) -> SimDevice:
        """The device behind a handle; call with its condition held."""
        device = handle.device
        if handle.closed:
            raise usb_error(LIBUSB_ERROR_INVALID_PARAM)
        if not device.present or handle.generation != device.generation:
            raise usb_error(LIBUSB_ERROR_NO_DEVICE)
        return device

    def set_configuration(self, dev_handle, config_value):
        device = dev_handle.device
        with device.cond:
            self._alive(dev_handle)
            if config_value not in (0, 1):
                raise usb_error(LIBUSB_ERROR_NOT_FOUND)
            if device.kernel_driver_active or device.claimed_by is not None:
                raise usb_error(LIBUSB_ERROR_BUSY)  # Linux refuses while a driver holds it
            device.configuration = config_value
            device.events.append(f"set_configuration {config_value}")

    def get_configuration(self, dev_handle):
        with dev_handle.device.cond:
            return self._alive(dev_handle).configuration

    def set_interface_altsetting(self, dev_handle, intf, altsetting):
        with dev_handle.device.cond:
            device = self._alive(dev_handle)
            if intf != device.interface or altsetting != 0:
                raise usb_error(LIBUSB_ERROR_NOT_FOUND)

    def claim_interface(self, dev_handle, intf):
        device = dev_handle.device
        with device.cond:
            self._alive(dev_handle)
            if intf != device.interface or device.configuration == 0:
                raise usb_error(LIBUSB_ERROR_NOT_FOUND)
            if device.kernel_driver_active or device.claimed_by not in (None, dev_handle):
                raise usb_error(LIBUSB_ERROR_BUSY)
            device.claimed_by = dev_handle
            device.events.append("claim")

    def release_interface(self, dev_handle, intf):
        device = dev_handle.device
        with device.cond:
            self._alive(dev_handle)
            if intf != device.interface or device.claimed_by is not dev_handle:
                raise usb_error(LIBUSB_ERROR_NOT_FOUND)
            device.claimed_by = None
            device.events.append("release")

    def is_kernel_driver_active(self, dev_handle, intf):
        with dev_handle.device.cond:
            device = self._alive(dev_handle)
            # Linux reports "no driver" (not an error) for an interface that does not exist.
            return intf == device.interface and device.kernel_driver_active

    def detach_kernel_driver(self, dev_handle, intf):
        with dev_handle.device.cond:
            device = self._alive(dev_handle)
            if intf != device.interface or not device.kernel_driver_active:
                raise usb_error(LIBUSB_ERROR_NOT_FOUND)
            device.kernel_driver_active = False
            device.events.append("detach")

    def attach_kernel_driver(self, dev_handle, intf):
        with dev_handle.device.cond:
            device = self._alive(dev_handle)
            if intf != device.interface:
                raise usb_error(LIBUSB_ERROR_NOT_FOUND)
            if device.kernel_driver_active or device.claimed_by is not None:
                raise usb_error(LIBUSB_ERROR_BUSY)
            device.kernel_driver_active = True
            device.events.append("attach")

    # --- transfers ------------------------------------------------------------------------

    def _check_bulk(self, handle: _Handle, ep: int, expected: int) -> SimDevice:
        device = self._alive(handle)
        if ep != expected:
            raise usb_error(LIBUSB_ERROR_INVALID_PARAM)
        if device.claimed_by is not handle:
            raise usb_error(LIBUSB_ERROR_NOT_FOUND)
        return device

    def bulk_write(self, dev_handle, ep, intf, data, timeout):
        device = dev_handle.device
        with device.cond:
            self._check_bulk(dev_handle, ep, ENDPOINT_OUT)
            if device._stall_writes:
                device._stall_writes -= 1
                device.halted.add(ep)
            if ep in device.halted:
                raise usb_error(LIBUSB_ERROR_PIPE)
            if device._fail_writes:
                raise usb_error(device._fail_writes.popleft())
            if not device.accepting:
                deadline = time.monotonic() + timeout / 1000
                while (remaining := deadline - time.monotonic()) > 0:
                    device.cond.wait(remaining)
                    self._alive(dev_handle)  # an unplug ends the wait at once
                raise usb_error(LIBUSB_ERROR_TIMEOUT)
            taken = len(data)
            if device.accept_per_write is not None:
                taken = min(taken, device.accept_per_write)
            device._out += data[:taken].tobytes()
            device.out_packets += max(1, -(-taken // device.max_packet))
            device.out_transfers += 1
            device.cond.notify_all()
            return taken

    def bulk_read(self, dev_handle, ep, intf, buff, timeout):
        device = dev_handle.device
        with device.cond:
            self._check_bulk(dev_handle, ep, ENDPOINT_IN)
            deadline = None if timeout == 0 else time.monotonic() + timeout / 1000
            while True:
                # The device answers the host's next IN token with STALL, so a read already
                # waiting gets the stall as well as the next one to start.
                if device._stall_reads:
                    device._stall_reads -= 1
                    device.halted.add(ep)
                if ep in device.halted:
                    raise usb_error(LIBUSB_ERROR_PIPE)
                if device._fail_reads:
                    raise usb_error(device._fail_reads.popleft())
                if device._in:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise usb_error(LIBUSB_ERROR_TIMEOUT)
                device.cond.wait(remaining)
                self._alive(dev_handle)
            got = 0
            while device._in:
                packet = device._in.popleft()
                device.in_packets += 1
                if len(packet) > len(buff) - got:
                    raise usb_error(LIBUSB_ERROR_OVERFLOW)  # the packet is lost, as on a bus
                buff[got:got + len(packet)] = array.array("B", packet)
                got += len(packet)
                if len(packet) < device.max_packet or got == len(buff):
                    break  # a short packet ends the transfer, or the buffer is full
            return got

    def ctrl_transfer(self, dev_handle, bmRequestType, bRequest, wValue, wIndex, data, timeout):
        with dev_handle.device.cond:
            device = self._alive(dev_handle)
            # Only GET_DESCRIPTOR(STRING) is needed (usb.util.get_string); devices stall the
            # control pipe on requests they do not support.
            if bmRequestType != 0x80 or bRequest != 0x06 or wValue >> 8 != 0x03:
                raise usb_error(LIBUSB_ERROR_PIPE)
            descriptor = device.string_descriptor(wValue & 0xFF)
            if descriptor is None:
                raise usb_error(LIBUSB_ERROR_PIPE)
            size = min(len(descriptor), len(data))
            data[:size] = array.array("B", descriptor[:size])
            return size

    def clear_halt(self, dev_handle, ep):
        with dev_handle.device.cond:
            device = self._alive(dev_handle)
            device.halted.discard(ep)
            device.events.append(f"clear_halt 0x{ep:02x}")
            device.cond.notify_all()


class TerminalBehindUsb:
    """The bridge's SimulatedTerminal behind a SimDevice, run by a thread: it reads bulk OUT
    bytes through the `length-prefixed` framer, hands each request to the terminal logic and
    sends its framed answers on bulk IN at their scheduled times.

    An answer scheduled before an unplug is dropped (the USB connection it was for is gone),
    as is the framer's partial input. A Behaviour with drop_link unplugs the device 50 ms
    after the request and replugs it after the scenario's replug_after.
    """

    def __init__(self, device: SimDevice, scenario: Scenario | None = None) -> None:
        self.device = device
        self.terminal = SimulatedTerminal(scenario)
        self.framer = make_framer("length-prefixed")
        self.frames_in = 0
        self.frames_out = 0
        self.dropped_answers = 0
        self._due: list[tuple[float, int, str, Any]] = []  # (at, seq, kind, detail) heap
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="simulated USB terminal",
                                        daemon=True)

    def __enter__(self) -> TerminalBehindUsb:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def ledger(self):
        return self.terminal.ledger

    def _run(self) -> None:
        generation = self.device.generation
        while not self._stop.is_set():
            wait = 0.05
            if self._due:
                wait = max(0.0, min(wait, self._due[0][0] - time.time()))
            data = self.device.take_out(timeout=wait)
            if self.device.generation != generation:
                self.framer.reset()
                generation = self.device.generation
            if data:
                for event in self.framer.receive_data(data, time.monotonic()):
                    if isinstance(event, FrameReceived):
                        self._on_request(event.payload, generation)
            self._fire(time.time())

    def _schedule(self, at: float, kind: str, detail: Any) -> None:
        heapq.heappush(self._due, (at, next(self._seq), kind, detail))

    def _on_request(self, payload: bytes, generation: int) -> None:
        self.frames_in += 1
        reaction = self.terminal.handle(json.loads(payload), time.time())
        if reaction.drop_link:
            now = time.time()
            self._schedule(now + 0.05, "unplug", None)
            self._schedule(now + 0.05 + self.terminal.scenario.link.replug_after, "replug", None)
        for answer in reaction.answers:
            self._schedule(answer.at, "answer", (answer, generation))

    def _fire(self, now: float) -> None:
        while self._due and self._due[0][0] <= now:
            _, _, kind, detail = heapq.heappop(self._due)
            if kind == "unplug":
                self.device.unplug()
            elif kind == "replug":
                self.device.replug()
            else:
                self._answer(*detail)

    def _answer(self, answer: Answer, generation: int) -> None:
        if answer.obsolete or (answer.entry is not None and answer.entry.behaviour.drop_link):
            return
        if generation != self.device.generation or not self.device.present:
            self.dropped_answers += 1
            return
        payload = json.dumps(answer.document, separators=(",", ":")).encode()
        self.framer.send_frame(payload, time.monotonic())
        self.device.send(self.framer.data_to_send())
        self.frames_out += 1
