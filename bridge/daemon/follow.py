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

import os
from collections.abc import Mapping
from typing import Any, Protocol


class LinkHolder(Protocol):
    """What the decision needs of a terminal worker."""

    poi_id: str
    identity: str  # confirmed | unknown | mismatch: <what the device said>
    holds_unconfirmed_sends: bool  # a request went to its device before it said who it is
    # Its device was asked who it is and did not say (no answer in time, none naming a
    # terminal, or one that cannot be read). A holder without it counts as still asking.
    left_unnamed: bool

    @property
    def online(self) -> bool: ...

    @property
    def config(self): ...  # noqa: ANN201 - a TerminalConfig


def partner_to_follow(workers: Mapping[str, LinkHolder], poi_id: str,
                      said: str) -> tuple[LinkHolder | None, str]:
    """The worker whose link to swap with `poi_id`'s, whose device says it is `said`; or
    None and why not. Only when `said`'s own link cannot hold it: a link the device has
    confirmed is never taken, and one whose device has not said who it is yet is waited
    for (the daemon asks again when that link's state changes: it names a terminal, fails
    its identity check, drops or fails to open)."""
    why_not = _never_now(workers, poi_id, said)
    if why_not:
        return None, why_not
    partner = workers[said]
    if awaits_its_own_link(partner):
        return None, f"{said}'s own link has not said yet which terminal is there"
    return partner, ""


def waits_for_its_own_link(workers: Mapping[str, LinkHolder], poi_id: str, said: str) -> bool:
    """Whether `said`'s own link not having said yet who is there is the only reason
    partner_to_follow refuses: then the decision waits for it. Not when it refuses for a
    reason that link cannot change (link kinds, one device, unconfirmed sends): the wrong
    device is reported then, not after waiting for that link."""
    partner = workers.get(said)
    return (partner is not None and awaits_its_own_link(partner)
            and not _never_now(workers, poi_id, said))


def _never_now(workers: Mapping[str, LinkHolder], poi_id: str, said: str) -> str:
    """Why `poi_id` is not followed to `said`'s link whatever that link says next; "" if
    nothing but that link stands in the way."""
    partner = workers.get(said)
    if partner is None:
        return f"{said} is not a terminal in the configuration"
    here = workers[poi_id].config.link
    there = partner.config.link
    if here.kind != there.kind:
        return (f"{said} is configured on a {there.kind} link, and this is a {here.kind} "
                "link: not followed")
    if _may_be_one_device(here, there):
        # Swapping would change nothing but drop both links, again at every message: the
        # two terminals would be followed back and forth.
        return (f"{said}'s link and this one may lead to the same device: not followed "
                "(run poi-bridge check-config)")
    for holder in (workers[poi_id], partner):
        if holder.holds_unconfirmed_sends:
            # That device may hold the payment (it did not answer the identity check, and
            # got the request anyway): asked about elsewhere, its NotFound would read "never
            # charged". Left where it is, it is asked about on this device, as before.
            return (f"{holder.poi_id} sent a request to its device before the device "
                    "said who it is: not followed, so that it is asked about where it went")
    if partner.identity == "confirmed":
        return (f"{said} is also confirmed on its own link: two devices say they are "
                f"{said}")
    return ""


def awaits_its_own_link(partner: LinkHolder) -> bool:
    """Whether a decision not to follow `partner` waits for its own link to say who is there
    (then the terminals are followed, or not, at that moment: most often a moment later).
    Not once that link is down, or its device named another terminal, or was asked and did
    not say who it is: nothing there says it is `partner`, whose device has named it on the
    other link. (A serial port with nothing plugged in opens, and never answers.)"""
    return (partner.online and partner.identity == "unknown"
            and not partner.left_unnamed)


def _may_be_one_device(here: Any, there: Any) -> bool:
    """Whether two links of one kind may reach the same device: one path, one address, or
    USB ids one of which takes any serial number (and any port, or the same one)."""
    if here.kind == "serial":
        return os.path.realpath(here.device) == os.path.realpath(there.device)
    if here.kind == "tcp":
        return (here.host.lower(), here.port) == (there.host.lower(), there.port)
    return (here.same_model(there)
            and (here.serial is None or there.serial is None or here.serial == there.serial)
            and (here.port is None or there.port is None or here.port == there.port))
