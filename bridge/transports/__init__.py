"""Byte-moving transports, one module per hardware kind (like python-can's interfaces/).

`open_transport(link)` builds the transport for a link config without opening it; the worker
calls `open()` and reopens with `Backoff` after `LinkClosed`. The USB transport is imported only
when a USB link is configured, so serial/TCP installs do not need pyusb.
"""

from __future__ import annotations

from collections.abc import Collection

from bridge.config import SerialLink, TcpLink, UsbLink
from bridge.transports.base import Backoff, LinkClosed, Transport

__all__ = ["Backoff", "LinkClosed", "Transport", "TransportUnavailable", "open_transport"]


class TransportUnavailable(RuntimeError):
    """The link kind is configured but its transport cannot be loaded on this install."""


def open_transport(link: SerialLink | TcpLink | UsbLink, *,
                   taken_serials: Collection[str] = (),
                   taken_ports: Collection[str] = ()) -> Transport:
    """Build (do not open) the transport for one link config. `taken_serials`,
    `taken_ports`: for a USB link, the serial numbers and ports other terminals with its ids
    are configured with."""
    if isinstance(link, SerialLink):
        from bridge.transports.serial import SerialTransport

        return SerialTransport(link)
    if isinstance(link, TcpLink):
        from bridge.transports.tcp import TcpTransport

        return TcpTransport(link)
    if isinstance(link, UsbLink):
        try:
            from bridge.transports.usb import UsbTransport
        except ImportError as exc:
            raise TransportUnavailable(
                f"USB links need bridge.transports.usb, which cannot be loaded: {exc}"
            ) from exc
        return UsbTransport(link, taken_serials=taken_serials, taken_ports=taken_ports)
    raise TypeError(f"no transport for link config {type(link).__name__}")
