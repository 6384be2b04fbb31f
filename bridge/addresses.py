"""How a host and port are written in every line a person reads (the daemon's log, the CLI)."""

from __future__ import annotations


def host_port(host: str, port: int) -> str:
    """HOST:PORT, an IPv6 address in brackets: `::1:1883` reads as an address alone, and
    `--broker` takes `[::1]:1883` back."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
