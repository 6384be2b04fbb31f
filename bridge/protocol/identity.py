"""Who the device on a terminal's link is: the identity check, and what is said while that
is not known.

A newly opened link may hold another terminal (a swapped cable, ports renumbered). Before
anything else goes out on it, the device is asked who it is: a DiagnosisRequest under the
bridge's own SaleID, whose answer, like every message a terminal sends, carries its POIID.
What this decides:
- which answers are to the checks this link sent (late ones too, and none of another
  session's), and that an answer without a POIID, one that cannot be read, a check refused,
  not delivered or not answered in time leaves the device unnamed;
- with which keys to ask: a device that cannot read the check, or whose answer cannot be
  read, is asked again with each key of the other terminals that may be on this link
  (`other_keys`: terminals set up with keys of their own, swapped cables), since it may be
  one of them; its answer, read with that key, names it, and the daemon follows it. The
  link's own terminal may come first there (its POIID): in a key rotation it has another
  key of its own, which the terminal may hold instead;
- how many unanswered checks a waiting request gets before it is refused
  (IDENTITY_CHECKS_BEFORE_REFUSING): a payment never goes to a device that has not said who
  it is, which might be another terminal that would charge it;
- the texts a register and a technician read while the device is unnamed, or names another
  terminal (and whether the daemon follows that one to another link).

Plain state and texts for one link, no transactions: what the session does with its
transactions meanwhile (hold a request, refuse it, let status polls wait) stays in
session.py. Everything here is forgotten when the link drops (`new_device`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from bridge.protocol import builders
from bridge.protocol.actions import Log, Send
from bridge.protocol.messages import Message

# Identity checks a device may leave unanswered (or answer without a POIID) before a request
# waiting for it is refused: a payment never goes to a device that has not said who it is
IDENTITY_CHECKS_BEFORE_REFUSING = 2
# A device that named another terminal is asked again after these pauses (s), doubling: a
# DiagnosisRequest is harmless on any terminal, and one that named another by a glitch (or
# whose cable is put back) is not shut out until a technician replugs it.
RECHECK_FIRST, RECHECK_MAX = 10.0, 300.0
BRIDGE_SALE_ID = "poi-bridge"  # the SaleID of the bridge's own identity checks
# An entry of `other_keys` naming a terminal's other key, in a key rotation: "<POIID>#other"
# (a POIID has no "#")
OTHER_KEY = "#other"


def key_owner(key_of: str) -> tuple[str, bool]:
    """The terminal an entry of `other_keys` names, and whether it is that terminal's other
    key (OTHER_KEY)."""
    if key_of.endswith(OTHER_KEY):
        return key_of[:-len(OTHER_KEY)], True
    return key_of, False


@dataclass(slots=True)
class IdentityCheck:
    service_id: str
    deadline: float
    key_of: str | None = None  # asked with this other terminal's key (None: the link's own)


class DeviceIdentity:
    """What the bridge knows of which terminal is on one terminal's link."""

    def __init__(self, poi_id: str) -> None:
        self.poi_id = poi_id  # the terminal the link is configured for
        self.named = False  # the device on this link has said who it is
        # The POIID the device on this link gave when it is not ours: a terminal on the wrong
        # port. Nothing is sent to it while it is set (requests are refused, polls wait), so
        # no payment runs on the wrong terminal; cleared when the link is reopened or the
        # right POIID is seen (named_as).
        self.wrong_device: str | None = None
        # The daemon follows this terminal to another link (the device here said it is
        # another configured terminal): what is refused meanwhile says so, not "check ports"
        self.following = False
        # While wrong_device is set, when to ask the device again who it is (a device that
        # named another terminal once, by a glitch, is not shut out until a replug), and the
        # pause after that ask: doubled each time, up to RECHECK_MAX
        self.recheck_at: float | None = None
        self.recheck_pause = RECHECK_FIRST
        self.asked = False  # the identity check went out on this link
        self.unnamed_checks = 0  # identity checks on this link that brought no POIID
        # ... counted since the link opened (unnamed_checks starts again for each request
        # refused): 0 while the first check is out, a device that has failed none yet
        self.unanswered_since_open = 0
        self.unnamed_reason = ""  # why the last one did not
        self.check: IdentityCheck | None = None  # the identity check on the wire
        self.sent_ids: deque[str] = deque(maxlen=16)  # the last checks sent: late answers
        # The other terminals whose keys a device that cannot take this terminal's key is
        # asked with, in this order (names only: the shell holds the keys, and encrypts)
        self.other_keys: tuple[str, ...] = ()
        self._own_key_failure = ""  # why the check with the link's own key failed
        # Checks asked with another terminal's key that were still on the wire when the
        # device named itself (a late answer to an earlier check): the device cannot read
        # them, and its crypto error, which names nothing, is theirs, not a payment's. Until
        # a deadline only: a device that drops what it cannot read never sends it, and a
        # crypto error much later is about something else.
        self.stray_refusals = 0
        self.strays_until = 0.0

    def new_device(self) -> None:
        """The link was opened or lost: whatever is plugged in next must say who it is again."""
        self.named, self.asked, self.check, self.wrong_device = False, False, None, None
        self.recheck_at, self.recheck_pause = None, RECHECK_FIRST
        self.following = False
        self.unnamed_checks = self.unanswered_since_open = 0
        # (the device before's: a refusal quoting it of the next device would mislead)
        self.unnamed_reason = self._own_key_failure = ""
        self.stray_refusals = 0

    def shift_times(self, delta: float) -> None:
        """The daemon's clock moved by `delta` (TerminalSession.shift_times): every time
        here this run set moves with it, so each wait stays as long as it was (a step back
        of an hour held a wrong device's recheck an hour off)."""
        if self.check is not None:
            self.check.deadline += delta
        if self.recheck_at is not None:
            self.recheck_at += delta
        if self.stray_refusals:
            self.strays_until += delta

    def named_as(self, poi_id: str) -> None:
        """The device on the link sent a message carrying `poi_id`."""
        self.named = True
        self.wrong_device = None if poi_id == self.poi_id else poi_id
        if self.wrong_device is None:
            self.recheck_at, self.recheck_pause = None, RECHECK_FIRST

    def recheck_due(self, now: float) -> bool:
        """Whether the device that named another terminal is to be asked again now (and, if
        not, when: recheck_at, set at the first call)."""
        if self.recheck_at is None:
            self.recheck_at = now + self.recheck_pause
        if now < self.recheck_at or self.check is not None:
            return False
        self.recheck_pause = min(self.recheck_pause * 2, RECHECK_MAX)
        self.recheck_at = now + self.recheck_pause
        return True

    def answers_a_check(self, message: Message) -> bool:
        """Whether `message` answers an identity check (this link's, or, by its SaleID, the
        bridge's on another link)."""
        header = message.message_header
        service_id = header.service_id if header else None
        return (service_id in self.sent_ids
                or (header is not None and header.sale_id == BRIDGE_SALE_ID
                    and message.category == "Diagnosis"))

    def ask(self, service_id: str, deadline: float, key_of: str | None = None) -> Send:
        """The identity check: the first thing on a newly opened link. No record: losing it
        to a crash loses nothing, the next start asks again."""
        self.asked = True
        self.check = IdentityCheck(service_id, deadline, key_of)
        self.sent_ids.append(service_id)
        document = builders.diagnosis_request(sale_id=BRIDGE_SALE_ID, service_id=service_id,
                                              poi_id=self.poi_id)
        return Send(document, BRIDGE_SALE_ID, service_id, "identify", key_of=key_of)

    def next_key(self, reason: str) -> str | None:
        """The check on the wire failed on its key (the device could not read it, or its
        answer cannot be read): the other terminal whose key to ask with next, or None when
        every one has been tried. A DiagnosisRequest carries nothing of a payment, so asking
        with another terminal's key costs nothing; its answer names the device."""
        tried = self.check.key_of if self.check is not None else None
        if tried is None:
            self._own_key_failure = reason
            return self.other_keys[0] if self.other_keys else None
        if tried not in self.other_keys:
            return None
        later = self.other_keys[self.other_keys.index(tried) + 1:]
        return later[0] if later else None

    def _keys_tried(self, last: str) -> tuple[str, ...]:
        if last not in self.other_keys:
            return (last,)
        return self.other_keys[:self.other_keys.index(last) + 1]

    def asking_with(self, key_of: str) -> Log:
        owner, other = key_owner(key_of)
        if other:
            return Log("info", f"terminal {self.poi_id}: the device on its link does not take its "
                               f"key, or answers in another; asking which terminal it is with "
                               f"{owner}'s other key (a key rotation), in case that "
                               "terminal's cable is in this port")
        if key_of == self.poi_id:
            return Log("info", f"terminal {self.poi_id}: the device on its link does not take "
                               "the key in use, or answers in another; asking which terminal "
                               "it is with its other key (previous_key: a key rotation)")
        return Log("info", f"terminal {self.poi_id}: the device on its link does not take its "
                           f"key, or answers in another; asking which terminal it is with "
                           f"{key_of}'s key, in case that terminal's cable is in this port")

    def named_meanwhile(self, expect_until: float) -> None:
        """The device named itself (a late answer to an earlier check) while a check asked
        with another terminal's key was on the wire: that check is not waited for, and the
        crypto error it will bring is expected until `expect_until` (stray_refusals)."""
        if self.check is not None and self.check.key_of is not None:
            self.stray_refusals += 1
            self.strays_until = expect_until
        self.check = None

    def stray_refusal_pending(self, now: float) -> bool:
        """Whether a crypto error now may be one a check named_meanwhile() abandoned
        (stray_refusal_expected, without counting it off)."""
        return bool(self.stray_refusals) and now <= self.strays_until

    def stray_refusal_expected(self, now: float) -> bool:
        """Whether a crypto error is the expected answer to a check named_meanwhile()
        abandoned (and is then counted off)."""
        if self.stray_refusals and now <= self.strays_until:
            self.stray_refusals -= 1
            return True
        self.stray_refusals = 0
        return False

    def answered(self, service_id: str) -> bool:
        """An answer to check `service_id`, one this link sent, came. True: it ends the
        check on the wire (a POIID it carried came through named_as first); False: a late
        answer to an earlier check, which changes nothing."""
        if self.check is None or self.check.service_id != service_id:
            return False
        self.check = None
        return True

    def unnamed(self, reason: str) -> Log:
        """The device did not say who it is. No payment goes to it (it may be another
        terminal, which would charge it: a swapped cable, found by the soak): the check is
        asked again, and after IDENTITY_CHECKS_BEFORE_REFUSING a waiting request is refused.
        Status polls still go; the POIID of each answer is checked."""
        if self.check is not None and self.check.key_of is not None:
            # The first failure, on the link's own key, is what a technician acts on
            tried = self._keys_tried(self.check.key_of)
            own = self.poi_id in tried
            others = list(dict.fromkeys(key_owner(poi_id)[0] for poi_id in tried
                                        if poi_id != self.poi_id))
            which = " and ".join(
                (["its other key (previous_key)"] if own else [])
                + ([f"{others[0]}'s key (in case it is that terminal)"] if len(others) == 1
                   else [f"the keys of {', '.join(others)} (in case it is one of those "
                         "terminals)"] if others else []))
            reason = f"{self._own_key_failure or reason}; asked again with {which}: {reason}"
        self.check = None
        self.unnamed_checks += 1
        self.unanswered_since_open += 1
        self.unnamed_reason = reason
        return Log("warning", f"terminal {self.poi_id}: {reason}; no payment goes to the "
                              "device until it says which terminal it is")

    def may_ask_again(self) -> bool:
        """Whether a request waiting for the device to say who it is gets another check."""
        return self.unnamed_checks < IDENTITY_CHECKS_BEFORE_REFUSING

    def checks_failed_text(self) -> str:
        """Why a waiting request is refused after IDENTITY_CHECKS_BEFORE_REFUSING checks."""
        return (f"the device on terminal {self.poi_id}'s link did not say which terminal "
                f"it is ({self.unnamed_checks} identity checks; the last: "
                f"{self.unnamed_reason}); nothing was sent: check the terminal, its "
                "cable and its key, then retry with a new ServiceID")

    def not_named_text(self) -> str:
        if self.check is not None:
            return (f"the device on terminal {self.poi_id}'s link is being asked which terminal "
                    "it is (just plugged in, or its link reopened); nothing was sent: send the "
                    "request again in a moment, with a new ServiceID")
        return (f"the device on terminal {self.poi_id}'s link has not said which terminal it is "
                f"({self.unnamed_reason or 'not asked yet'}); nothing was sent: check the "
                "terminal, its cable and its key, then retry with a new ServiceID")

    def wrong_device_text(self) -> str:
        if self.following:
            return (f"the device on terminal {self.poi_id}'s link says it is "
                    f"{self.wrong_device}: the bridge now looks for {self.poi_id} on the link "
                    f"where it expected {self.wrong_device} (cables swapped); nothing was "
                    "sent, retry with a new ServiceID")
        return (f"the device on terminal {self.poi_id}'s link says it is {self.wrong_device}; "
                "nothing was sent until a technician checks which terminal is plugged into "
                "which port; then retry with a new ServiceID")

    def wrong_device_poll_text(self) -> str:
        """Why a status poll did not go: not the refusal's "nothing was sent", which would
        tell a cashier that a payment the terminal may have charged never went out."""
        where = (f"the bridge now looks for {self.poi_id} on the link where it expected "
                 f"{self.wrong_device} (cables swapped)" if self.following else
                 "check which terminal is plugged into which port")
        return (f"the device on terminal {self.poi_id}'s link says it is {self.wrong_device}; "
                f"the status poll waits for {self.poi_id} itself: {where}")
