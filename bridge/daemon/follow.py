"""Terminals found on each other's links are followed there.

A technician who swaps two terminals' cables, or a DHCP server that swaps two TCP terminals'
addresses, leaves each configured link holding the other terminal. The identity check finds
this out (every message a terminal sends names it). Rather than refuse both terminals until
someone puts the cables back, the daemon swaps the two terminals' links, in memory, when it
can tell whose device is where; the configuration applies again at the next start, and the
log says what to fix. Nothing is lost by it: transactions belong to the terminal, not the
link, and a terminal's open ones are asked about on its new link by status poll, as after
any replug.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class LinkHolder(Protocol):
    """What the decision needs of a terminal worker."""

    poi_id: str
    identity: str  # confirmed | unknown | mismatch: <what the device said>

    @property
    def online(self) -> bool: ...

    @property
    def config(self): ...  # noqa: ANN201 - a TerminalConfig


def partner_to_follow(workers: Mapping[str, LinkHolder], poi_id: str,
                      said: str) -> tuple[LinkHolder | None, str]:
    """The worker whose link to swap with `poi_id`'s, whose device says it is `said`; or
    None and why not. Only when `said`'s own link cannot hold it: a link the device has
    confirmed is never taken, and one whose device has not said who it is yet is waited
    for (its answer, a mismatch, asks again)."""
    partner = workers.get(said)
    if partner is None:
        return None, f"{said} is not a terminal in the configuration"
    here = workers[poi_id].config.link
    there = partner.config.link
    if here.kind != there.kind:
        return None, (f"{said} is configured on a {there.kind} link, and this is a {here.kind} "
                      "link: not followed")
    if partner.identity == "confirmed":
        return None, (f"{said} is also confirmed on its own link: two devices say they are "
                      f"{said}")
    if partner.online and partner.identity == "unknown":
        return None, f"{said}'s own link has not said yet which terminal is there"
    return partner, ""
