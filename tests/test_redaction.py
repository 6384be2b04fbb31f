"""No card data or key material in the logs, even when a terminal puts it where we log."""

from __future__ import annotations

import ast
import asyncio
import io
import json
import logging
import re
from pathlib import Path
from urllib.parse import parse_qsl

import pytest

from bridge.logging_setup import setup_logging
from bridge.redaction import REDACTED, redact, redact_json
from bridge.simulator import responses

from .rig import POI, Daemon, Simulator, Subscriber, outcome_for, write_config

PAN = "5413330089600010"
TRACK2 = f";{PAN}=25121010000012345678?"
PASSPHRASE = "s3cret-passphrase-for-test"
FIXTURES = sorted((Path(__file__).parent / "fixtures" / "adyen").glob("*.json"))

# The policy, written out here rather than taken from the module: fields whose value never
# reaches a log line. Card data per PCI DSS (PAN, expiry, service code, cardholder name),
# sensitive authentication data (track, CVC, PIN block), identifiers tied to one card or
# shopper (alias, token, payment account reference), personal data (e-mail, telephone, IP,
# names) and key material. Not in it, and kept: MaskedPan, cardBin and cardSummary (PCI DSS
# allows the first six and last four digits to be shown), issuer and shopper country,
# shopperReference (the merchant's own customer number) and every ID, amount and outcome.
SENSITIVE = {
    "sensitivecarddata", "trackdata", "trackvalue", "track1", "track2", "track3", "nexoblob",
    "hmac", "nonce", "passphrase", "password", "keyvalue", "pan", "cardnumber", "expirydate",
    "expirymonth", "expiryyear", "expiry", "expdate", "cardseqnumb", "servicecode", "cvc",
    "cvc2", "cvv", "cvv2", "csc", "securitycode", "cardsecuritycode", "cardverificationcode",
    "cardverificationvalue", "pin", "pinblock", "encryptedpinblock", "alias",
    "paymentaccountreference", "tokenvalue", "cardholdername", "holdername", "shoppername",
    "firstname", "lastname", "shopperemail", "email", "shoppertelephone", "telephonenumber",
    "shopperip",
}


def sensitive(key: str) -> bool:
    return key.replace("_", "").lower() in SENSITIVE


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def card_numbers_in(text: str) -> list[str]:
    """Every 13-19 digit run passing the Luhn check, also one grouped by single spaces, dashes,
    dots, `+` or `%20` (the groups of a run are tried from each group on). Digits glued to
    letters are an identifier's (4r7i001556529591000, an Adyen TransactionID), not a card's."""
    found = []
    for run in re.findall(r"(?:(?<![A-Za-z\d])|(?<=%[0-9A-Fa-f]{2}))\d+(?:(?:[ .+-]|%20)\d+)*"
                          r"(?![A-Za-z\d])", text):
        groups = re.split(r"[ .+-]|%20", run)
        for i in range(len(groups)):
            for j in range(i, len(groups)):
                digits = "".join(groups[i:j + 1])
                if 13 <= len(digits) <= 19 and luhn_ok(digits):
                    found.append(digits)
    return found


@pytest.mark.parametrize("text", [
    f"card {PAN}", "card 5413 3300 8960 0010", f"track {TRACK2}",
    f"%B{PAN}^DOE/JOHN^25121010000000000000?", '"ExpiryDate": "2512"',
    '"SensitiveCardData": {"ExpiryDate": "0228", "CardSeqNumb": "01"}',
    "NexoBlob=fMtXTcQCbAi3gAwtOANt4tQEz2UUrorGVnDuCeYXTJUoF+NyNCmj+bwILU9io34q",
])
def test_sensitive_shapes_are_redacted(text):
    cleaned = redact(text)
    assert "[redacted]" in cleaned
    for secret in (PAN, "5413 3300 8960 0010", "0228", "2512", "fMtXTcQCbAi3gAwtOANt4"):
        assert secret not in cleaned


# (text, what must not survive): the shapes a review found unredacted, and their neighbours.
LEAKY_SHAPES = [
    # URL-encoded key=value, as in a terminal's AdditionalResponse (and its plain form)
    ("tid=1&expiryDate=12%2f2025&cardHolderName=JOHN%20DOE&expiryMonth=12&expiryYear=2025",
     ["12%2f2025", "JOHN", "DOE", "Month=12", "Year=2025"]),
    ("message=declined&expiryDate=12/2025&cardHolderName=JOHN DOE tid=1",
     ["12/2025", "JOHN", "DOE"]),
    (("shopperEmail=john.doe%40example.com&alias=M900978995070104&paymentAccountReference="
      "V0010013018036776997406844475&cardNumber=5413330089600010"),
     ["john.doe", "M900978995070104", "V0010013018036776997406844475", PAN]),
    ("ExpiryDate%3d2512%26CardHolderName%3dJOHN%2bDOE", ["2512", "JOHN"]),
    # JSON, any case
    ('{"expiryDate": "12/2025", "cardHolderName": "JOHN DOE", "pan": "5413330089600010"}',
     ["12/2025", "JOHN", PAN]),
    ('{"EXPIRYDATE":"2512","ShopperEmail":"john.doe@example.com","expiryMonth":12}',
     ["2512", "john.doe", ":12"]),
    (('{"SensitiveCardData": {"ExpiryDate": "2512", "TrackData": [{"TrackNumb": 2, '
      '"TrackValue": "5413330089600010D25121010000012345678F"}]}}'), ["2512", PAN]),
    (json.dumps(json.dumps({"ExpiryDate": "2512", "CardHolderName": "JOHN DOE"})),
     ["2512", "JOHN"]),
    ('{"ExpiryDate": "25', ["25"]),  # a line cut off in the value
    # Python reprs, also of snake_case attributes and bytes
    (repr({"SensitiveCardData": {"ExpiryDate": "2512"}, "PAN": PAN}), ["2512", PAN]),
    ("{'ExpiryDate': '2512', 'cardHolderName': \"O'BRIEN\"}", ["2512", "BRIEN"]),
    ("CardData(pan='5413330089600010', expiry_date='2512', holder_name='JOHN DOE')",
     [PAN, "2512", "JOHN"]),
    ("{'Hmac': b'\\x01\\x02secret'}", ["secret"]),
    # sensitive authentication data under its long names, any case
    ('{"CardSecurityCode": "739", "CARDSECURITYCODE": "7391"}', ["739"]),
    ("card_security_code='739' cardsecuritycode=7391&cardVerificationValue=7392", ["739"]),
    # a name runs through apostrophes, %20 and hyphens
    ("cardHolderName=O'BRIEN%20JOHN&x=1", ["BRIEN", "JOHN"]),
    ("tid=1&cardholdername=MARY-JANE%20O'NEIL-SMITH&shopperName=D'ARC%20JEAN-PAUL&x=2",
     ["MARY", "JANE", "NEIL", "SMITH", "ARC", "JEAN", "PAUL"]),
    ("message=declined cardHolderName=JEAN-PAUL D'ARC O'NEIL tid=1", ["JEAN", "ARC", "NEIL"]),
    # track 1 and 2 in every shape, with sentinels or without
    (f"B{PAN}^DOE/JOHN^25121010000000000000", [PAN, "JOHN", "2512101"]),
    (f"track1=%25B{PAN}%5eDOE%2fJOHN%5e25121010000000000000%3f", [PAN, "JOHN", "2512101"]),
    (f"{PAN}D25121010000012345678F", [PAN, "2512101"]),
    ("57135413330089600010D25121010000012345678F", [PAN, "2512101"]),
    (f"{PAN}=25121010000012345678", [PAN, "2512101"]),
    (f"track=%3b{PAN}%3d25121010000012345678%3f", [PAN, "2512101"]),
    ('{"TrackValue": "4111111111111111=2512101"}', ["4111111111111111", "2512101"]),
    # card numbers, grouped or embedded
    ("value=5413%203300%208960%200010", ["5413%203300"]),
    ("card 5413.3300.8960.0010", ["5413.3300"]),
    ("card 5413+3300+8960+0010", ["5413+3300"]),
    (f"card {PAN}.", [PAN]),
    (f"ids 12 {PAN}", [PAN]),
    ("card 5413/3300/8960/0010", ["5413/3300", "8960/0010"]),
    ("card 5413_3300_8960_0010", ["5413_3300", "8960_0010"]),
    ("card 5413\t3300\t8960\t0010", ["5413\t3300", "8960\t0010"]),
    ("card\n5413\n3300\n8960\n0010\n", ["5413\n3300", "8960\n0010"]),
    ("digits [5413, 3300, 8960, 0010]", ["5413, 3300", "8960, 0010"]),
    # numbers before the card that, with its first groups, pass the Luhn check themselves
    # (the middle of the card stayed: `[redacted] 1111 1111`)
    ("counts 10 20 30 4111 1111 1111 1111", ["1111 1111"]),
    ("amex 3782/822463/10005 and 3782_822463_10005", ["822463"]),
    # glued to letters (the identifier's own digits stay)
    ("SaleID=POS14111111111111111 POIID=V400m-P4111111111111111",
     ["4111111111111111", "41111111111"]),
    ("ID5413330089600010ABC amex A378282246310005 diners X30569309025904 visa13 C4222222222222",
     [PAN, "378282246310005", "30569309025904", "4222222222222"]),
    ("P4111 1111 1111 1111, 5413-3300-8960-0010Z, TILL1 5413330089600010", ["4111 1111",
                                                                           "5413-3300", PAN]),
    ("diners 3056/930902/5904, 3056_930902_5904\n3056\t930902\t5904", ["930902"]),
    # a field after a slash is still a field, unless it names a file and its error follows
    ("posEntryMode=ICC/cvc=737 acquirer/ExpiryDate=12/29", ["737", "12/29"]),
    ("key/KeyValue=00112233445566778899aabbccddeeff", ["00112233"]),
    ("terminals/0/key/Passphrase: hunter2 and JOHN/CardHolderName=JOHN DOE",
     ["hunter2", "JOHN DOE"]),
    ("cannot read /etc/poi-bridge/credentials/pan: 5413330089600010", ["5413330089600010"]),
    ("/etc/x/cvc: 737 and /etc/y/password: swordfish", ["737", "swordfish"]),
    # a passphrase or password of several words, or with punctuation (the crypto audit: all
    # but its first word stayed)
    ("passphrase=correct horse battery staple", ["horse", "staple"]),
    ("Passphrase: open, sesame; now (really)", ["sesame", "really"]),
    ('x=1 password=two words&y=2', ["two", "words"]),
    ("Passphrase: open, sesame (really) now", ["sesame", "really", "now"]),
    # key material without a field name
    ("derived 8f14e45fceea167a5a36dedd4bea2543a6b1c1d2e3f4a5b6c7d8e9f0a1b2c3d4", ["8f14e45fceea"]),
    ("blob fMtXTcQCbAi3gAwtOANt4tQEz2UUrorGVnDuCeYXTJUoF+NyNCmj+bwILU9io34q==", ["fMtXTcQC"]),
]


@pytest.mark.parametrize("text,secrets", LEAKY_SHAPES)
def test_card_data_in_every_shape_is_redacted(text, secrets):
    cleaned = redact(text)
    assert "[redacted]" in cleaned
    for secret in secrets:
        assert secret not in cleaned, (secret, cleaned)
    assert not card_numbers_in(cleaned), cleaned


@pytest.mark.parametrize("name", sorted(SENSITIVE))
@pytest.mark.parametrize("spell", [str, str.upper, lambda n: n[:1].upper() + n[1:]])
@pytest.mark.parametrize("shape", ['{{"{k}": "SECRETVALUE"}}', "{{'{k}': 'SECRETVALUE'}}",
                                   "x=1&{k}=SECRETVALUE&y=2", "got {k}=SECRETVALUE, done",
                                   "{k}%3dSECRETVALUE", "{k}: SECRETVALUE", "{k}=SECRETVALUE"])
def test_every_sensitive_field_in_every_shape(name, spell, shape):
    cleaned = redact(shape.format(k=spell(name)))
    assert "SECRETVALUE" not in cleaned and "[redacted]" in cleaned, cleaned


ORDINARY = [
    "terminal V400m-324688179: Payment POS1/S1 -> approved (terminal)",
    "ServiceID 1234567890123",  # not a card number: fails the Luhn check
    "at 2026-11-22T10:00:00.000Z amount 12.50",
    ("terminal P400Plus-275039202: answer for POS1/R2 ServiceID=1234567890 "
     "POIID=P400Plus-275039202 TransactionID=4r7i001556529591000 at 2019-04-29T09:19:51.000Z "
     "tid=75039202 message=APPROVED amount=12.50 EUR"),
    ('{"ServiceID": "0207111104", "POIID": "V400m-324688179", "SaleID": "POS1", '
     '"TransactionID": "oLkO001529481092000", "TimeStamp": "2018-06-20T09:51:32.000Z", '
     '"AuthorizedAmount": 15.25, "MaskedPan": "541333 **** 0010", "Result": "Success"}'),
    ("tid=75039202&pspReference=8515565295894301&cardBin=541333&cardSummary=0010"
     "&issuerCountry=NL&aliasType=Default&cvcResult=0%20Unknown&posAuthAmountValue=100"
     "&refusalReasonRaw=APPROVED&iso8601TxDate=2019-04-29T09%3a19%3a51.0000000%2b0000"
     "&shopperReference=69950"),
    "monotonic 1732269600.1234567 took 0.0123456789012345 s, pid 12345, 10.0.0.12:8883",
    "name=Card&value=%2a%2a%2a%2a%2a%2a%2a%2a%2a%2a%2a%2a0010&key=pan",
    "company=ACME; expand the panel; mapping passed; hostname=poi-1; key=header1",
    "frame of 1234 bytes, retry 3/10, outbox 0, undelivered 2, refused_by_broker 0",
    "EventDetails message=Empty+input+which+would+have+resulted+in+a+null+result.",
    # masks that show no more than the first six (eight) and the last four digits
    ('"MaskedPan": "411111******1111", "BIN8": "41111111****1111", "Amex": "378282*****0005"'),
    "masks ************1111 XXXXXXXXXXXX1111 411111xxxxxx1111 541333##########",
    # also in groups, next to other numbers; an `x` between numbers is no mask
    ("masks 541333 **** 9999 1234 EUR, 5413 33** **** 0010 2026-11-30, 2026 5413-33XX-XXXX-0010"
     ", **** **** **** 1111 **** **** **** 2222, 1920 x 1080 x 1234567890 0x1234 0x5678 0x9012"),
    # slashes, underscores, tabs, line ends and `, ` join only the groups a card number is
    # written in (4111/1111/1111/1111, 3782/822463/10005): these pass the Luhn check as 3-6
    # digit groups
    "on 2019/04/29 retry 3/10, 10/20, path /var/lib/poi-bridge/1234567/890123/45",
    "sizes [1, 12, 123, 1234, 12345, 123456], ports 1883, 8883\n\t1\t2\t3\n",
    "session_1556529591_000 t_12_34_56 4r7i001556529591000/8515565295894301",
    "polls at 12345, 67890, 11111, 22222",
    "GET /v1/stores/137758/388926/961437/x",
    "queue\n47311\n18230\n49617\n49481\n",
    "ids\t81277\t45356\t77364\t17098",
    "file batch_926579_943477_450868.log",
    # one digit throughout, or zeros for an issuer's number: a counter, not a card (nor a mask)
    "checksum 0000000000000000, 0000 0000 0000 0000, counter 0000001234567897",
    "ledger 0000000000001x",
    # a file named like a field is a path: its error text is what the technician needs
    "cannot read the MQTT password file /etc/poi-bridge/credentials/mqtt-password: Permission "
    "denied; /run/credentials/poi-bridge.service/secret_pin: No such file or directory",
    # hexadecimal, however long: no mask
    "address 0x0000000000001234, flags 0X00000000DEADBEEF",
    # digits glued to letters or after a decimal point, Luhn-valid but not as issued cards
    # start: times (milli-, micro-, nanoseconds), an Adyen TransactionID whose fourth
    # character is a digit (3 and the zero-padded time are a Luhn-valid 16 digits), a
    # fraction below 0.1, 15 digits not from 34 or 37; UUIDs; amounts in minor units
    ("T1732269600125 ts1732269600123404 t=1732269600123400210ns Xy23001556529591004 "
     "took 0.0412345678901233 s, ratio 2.412345678901233"),
    ("request 550e8400-e29b-41d4-a716-446655440000 f47ac10b-58cc-4372-a567-0e02b2c3d479 "
     "6ba7b810-9dad-11d1-80b4-00c04fd430c8 amount EUR1250 12.50 1234567.89"),
    "",
]


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_lines_are_left_alone(text):
    assert redact(text) == text


def kv_like(text: str) -> bool:
    return bool(re.fullmatch(r"[\w.]+=[^&]*(?:&[\w.]+=[^&]*)*", text))


def assert_redacted_like(original, cleaned, where="$"):
    """`cleaned` is `original` with exactly the sensitive values replaced, nothing else."""
    if isinstance(original, dict):
        assert isinstance(cleaned, dict) and list(cleaned) == list(original), where
        for key, value in original.items():
            if sensitive(key):
                assert cleaned[key] == "[redacted]", f"{where}.{key}: {cleaned[key]!r}"
            else:
                assert_redacted_like(value, cleaned[key], f"{where}.{key}")
    elif isinstance(original, list):
        assert isinstance(cleaned, list) and len(cleaned) == len(original), where
        for i, (a, b) in enumerate(zip(original, cleaned)):
            assert_redacted_like(a, b, f"{where}[{i}]")
    elif isinstance(original, str) and kv_like(original):
        pairs, cleaned_pairs = parse_qsl(original), parse_qsl(cleaned)
        assert [k for k, _ in cleaned_pairs] == [k for k, _ in pairs], where
        for (key, value), (_, cleaned_value) in zip(pairs, cleaned_pairs):
            expected = "[redacted]" if sensitive(key) else value
            assert cleaned_value == expected, f"{where} {key}={cleaned_value!r}"
    else:
        assert cleaned == original, f"{where}: {cleaned!r}"


def with_card_data(doc):
    """The fixture as a terminal that sends everything it should not would send it."""
    def walk(node):
        if isinstance(node, dict):
            for key, value in list(node.items()):
                if key == "AdditionalResponse" and kv_like(value):
                    node[key] = (value + "&cardHolderName=JOHN%20DOE&shopperEmail=john.doe%40"
                                 "example.com&expiryDate=03%2f2031&cardNumber=" + PAN)
                elif key == "CardData":
                    value.update({"PAN": PAN, "TrackData": [{"TrackValue": TRACK2}],
                                  "SensitiveCardData": {"ExpiryDate": "0331", "PAN": PAN}})
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)
    walk(doc)
    return doc


def values_of(doc, found=None):
    """Expiry values and cardholder names a fixture holds (also inside its key=value strings)."""
    found = [] if found is None else found
    if isinstance(doc, dict):
        for key, value in doc.items():
            if isinstance(value, (str, int)) and sensitive(key) and len(str(value)) >= 4:
                found.append(str(value))
            values_of(value, found)
    elif isinstance(doc, list):
        for item in doc:
            values_of(item, found)
    elif isinstance(doc, str) and kv_like(doc):
        for key, value in parse_qsl(doc):
            if sensitive(key) and len(value) >= 4:
                found.append(value)
    return found


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
@pytest.mark.parametrize("hostile", [False, True], ids=["as-is", "with-card-data"])
def test_vendor_fixtures_lose_their_card_data_and_keep_the_rest(path, hostile):
    doc = json.loads(path.read_text())
    if hostile:
        doc = with_card_data(doc)
    forms = {"file": path.read_text() if not hostile else json.dumps(doc, indent=2),
             "compact": json.dumps(doc), "repr": repr(doc)}
    for form, text in forms.items():
        cleaned = redact(text)
        assert not card_numbers_in(cleaned), (form, card_numbers_in(cleaned))
        assert "JOHN" not in cleaned and "john.doe" not in cleaned, form
        for secret in values_of(doc):
            assert f'"{secret}"' not in cleaned and f"'{secret}'" not in cleaned, (form, secret)
        parsed = ast.literal_eval(cleaned) if form == "repr" else json.loads(cleaned)
        assert_redacted_like(doc, parsed, form)
    for secret in ("12%2f2025", "12/2025", "TC03_MS_Approved", "03%2f2031", "0331", TRACK2):
        assert secret not in redact(forms["file"]) and secret not in redact(forms["repr"])


def test_a_vendor_additional_response_in_a_log_line():
    doc = json.loads((FIXTURES[0].parent / "java-payment-sync-success.json").read_text())
    additional = doc["SaleToPOIResponse"]["PaymentResponse"]["Response"]["AdditionalResponse"]
    line = redact(f"terminal P400Plus-275039202: unusable answer for POS1/R2: {additional}")
    for secret in ("expiryDate=12", "expiryMonth=12", "expiryYear=2025", "TC03_MS_Approved",
                   "M900978995070104"):
        assert secret not in line
    for kept in ("terminal P400Plus-275039202: unusable answer for POS1/R2: tid=75039202&",
                 "pspReference=8515565295894301", "refusalReasonRaw=APPROVED",
                 "cardSummary=3511", "cardBin=541333", "posAuthAmountValue=100",
                 "iso8601TxDate=2019-04-29T09%3a19%3a51.0000000%2b0000"):
        assert kept in line


def test_the_daemon_log_handler_redacts(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    setup_logging("debug")
    try:
        logging.getLogger("poi_bridge.test").warning("terminal said %s and %s", PAN, TRACK2)
        try:
            raise ValueError(f"bad card {PAN}")
        except ValueError:
            logging.getLogger("poi_bridge.test").exception("failure")
    finally:
        logging.getLogger().handlers.clear()
    output = stream.getvalue()
    assert PAN not in output and "[redacted]" in output


def card_data_response(tmp_path) -> str:
    """A terminal that sends everything it should not: full PAN, track 2, expiry."""
    doc = responses.payment_response(responses.payment_request("X", "1", POI, 5.0), "approve", 0)
    card = doc["SaleToPOIResponse"]["PaymentResponse"]["PaymentResult"]["PaymentInstrumentData"]
    card["CardData"].update({"PAN": PAN, "TrackData": [{"TrackValue": TRACK2}],
                             "SensitiveCardData": {"PAN": PAN, "ExpiryDate": "2512"}})
    path = tmp_path / "card-data.json"
    path.write_text(json.dumps(doc))
    return str(path)


def event_with_card_data(tmp_path) -> str:
    path = tmp_path / "event.json"
    path.write_text(json.dumps({"SaleToPOIRequest": {
        "MessageHeader": {"MessageCategory": "Event", "MessageClass": "Event",
                          "MessageType": "Notification", "ProtocolVersion": "3.0",
                          "SaleID": "X", "ServiceID": "1", "POIID": POI},
        "EventNotification": {"EventToNotify": "Reject", "TimeStamp": "2026-11-22T10:00:00Z",
                              "EventDetails": f"message=bad card {PAN} track {TRACK2}"}}}))
    return str(path)


async def test_no_card_data_or_key_material_in_any_daemon_log_line(tmp_path, mosquitto):
    secret = tmp_path / "key"
    secret.write_text(PASSPHRASE)
    scenario = tmp_path / "scenario.json"
    scenario.write_text(json.dumps({
        "poi_id": POI,
        "default": {"delay": 0.05, "response_file": card_data_response(tmp_path)},
        "transactions": [{"amount": 2.0, "response_file": event_with_card_data(tmp_path)}],
    }))
    sim = Simulator(tmp_path, "--scenario", str(scenario), "--key-id", "K1",
                    "--passphrase-file", str(secret))
    config = write_config(tmp_path, mosquitto, sim.link, terminal={"payment_timeout": 2.0})
    with open(config, "a") as handle:
        handle.write(f'[terminals.key]\nidentifier = "K1"\nversion = 1\n'
                     f'passphrase_file = "{secret}"\n')
    daemon = Daemon(config, tmp_path).start()
    try:
        async with Subscriber(mosquitto, ["poi-bridge/registers/POS1/#",
                                          f"poi-bridge/terminals/{POI}/state"]) as register:
            # (a fixed second was too short for a daemon starting on a loaded box: the
            # request then found no subscriber and was lost, and the test timed out)
            await register.wait_for(lambda t, p: t.endswith("/state")
                                    and p["state"] == "online", timeout=30)
            await register.publish(f"poi-bridge/terminals/{POI}/request",
                                   responses.payment_request("POS1", "R1", POI, 5.0))
            approved = await register.wait_for(outcome_for("R1"), timeout=20)
            assert approved["bridge"]["outcome"] == "approved"
            await register.publish(f"poi-bridge/terminals/{POI}/request",
                                   responses.payment_request("POS1", "R2", POI, 2.0))
            await register.wait_for(lambda t, p: t.endswith("/event")
                                    and p["event"] == "awaiting_status", timeout=20)
            await asyncio.sleep(1.0)
    finally:
        daemon.kill()
        sim.stop()
    log = daemon.log()
    assert "unusable answer for POS1/R2" in log  # the terminal's event did reach the log...
    assert "[redacted]" in log                   # ...with its card data taken out
    for secret_text in (PAN, "5413 3300", TRACK2, PASSPHRASE, "2512101"):
        assert secret_text not in log, secret_text
    # The register does receive what the terminal itself sent (the bridge does not alter it).
    card = approved["SaleToPOIResponse"]["PaymentResponse"]["PaymentResult"]
    assert card["PaymentInstrumentData"]["CardData"]["PAN"] == PAN


def test_a_terminals_own_text_in_a_detail_is_redacted_and_cut():
    """A detail quotes the terminal's Result, ErrorCondition or event text, and goes where
    the log's redaction never looks: the journal, `transactions`, events, bridge.error."""
    from bridge.protocol.messages import parse_message
    from bridge.protocol.outcome import classify

    doc = responses.payment_response(responses.payment_request("X", "1", POI, 5.0), "approve", 0)
    body = doc["SaleToPOIResponse"]["PaymentResponse"]["Response"]
    body["Result"] = f"Unknown {PAN} 12/25"
    detail = classify(parse_message(json.dumps(doc))).detail
    assert PAN not in detail and "[redacted]" in detail and detail.startswith("unknown Result")
    body["Result"], body["ErrorCondition"] = "Failure", f"Refusal {TRACK2}"
    detail = classify(parse_message(json.dumps(doc))).detail
    assert PAN not in detail and "Failure / " in detail
    body["ErrorCondition"] = "x" * 5000
    assert len(classify(parse_message(json.dumps(doc))).detail) < 200
    event = {"SaleToPOIRequest": {
        "MessageHeader": {"ProtocolVersion": "3.0", "MessageClass": "Event",
                          "MessageCategory": "Event", "MessageType": "Notification",
                          "ServiceID": "1", "DeviceID": "1", "SaleID": "X", "POIID": POI},
        "EventNotification": {"TimeStamp": "2026-11-30T10:00:00Z", "EventToNotify": "Reject",
                              "EventDetails": f"card {PAN} refused"}}}
    detail = classify(parse_message(json.dumps(event))).detail
    assert detail.startswith("terminal sent event Reject") and PAN not in detail


@pytest.mark.parametrize("text,expected", [
    # the letters' identifier keeps its own digits, the card's are redacted
    ("SaleID POS14111111111111111", "SaleID POS1[redacted]"),
    ("SaleID=P4111111111111111&x=1", "SaleID=P[redacted]&x=1"),
    ("TILL14111111111111111ABC done", "TILL1[redacted]ABC done"),
    ("4111111111111111Z", "[redacted]Z"),
    ("P4111 1111 1111 1111.", "P[redacted]."),
    # an Adyen TransactionID stays, a card number glued to it does not
    ("4r7i001556529591000 4r7i0015565295910004111111111111111",
     "4r7i001556529591000 4r7i001556529591000[redacted]"),
])
def test_a_card_number_glued_to_letters_is_redacted(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize("text,expected", [
    ('"MaskedPan": "4111111111**1111"', '"MaskedPan": "411111******1111"'),
    ('"MaskedPan": "555555555555****"', '"MaskedPan": "555555**********"'),
    ("MaskedPan=411111111111XXXX&x=1", "MaskedPan=411111XXXXXXXXXX&x=1"),
    ("card 4111111111111XXX.", "card 411111XXXXXXXXXX."),
    ("tail ******4111111111 end", "tail ************1111 end"),
    ("middle 4111##1111##1111", "middle 4111########1111"),
    ("amex 3782822*****005", "amex 378282******005"),
    ("two 541333333****0010 and 5413333300****10", "two 541333*******0010 and 541333********10"),
    # in groups, as terminals write them: each group keeps its place
    ("MaskedPan 4111 1111 1111 *111", "MaskedPan 4111 11** **** *111"),
    ("4111-1111-111*-1111", "4111-11**-****-1111"),
    ('"MaskedPan": "5413 3300 89XX XXXX"', '"MaskedPan": "5413 33XX XXXX XXXX"'),
    ("amex 3782 8224** ***05, 19 digits 4111 1111 1111 1111 *11",
     "amex 3782 82**** ***05, 19 digits 4111 11** **** **** *11"),
    # which groups are the card is taken from the card's grouping (4-4-4-4, 4-6-5)
    ("ids 2026 4111 1111 1111 *111 and 4111 1111 1111 *111 2026",
     "ids 2026 4111 11** **** *111 and 4111 11** **** *111 2026"),
])
def test_a_mask_that_shows_too_much_is_masked_down_to_the_first_six_and_last_four(text,
                                                                                 expected):
    assert redact(text) == expected


@pytest.mark.parametrize("amount", ["2.2199999999999998", "12.5413330089600010",
                                    "3.4111111111111111", "0.30000000000000004"])
def test_the_digits_of_a_decimal_number_are_never_taken_for_a_card_number(amount):
    """The second diff review: 0601765 redacted a fraction that starts and checks as a card
    number does (58 of 9,995 computed prices), blanking a register's float amounts where a
    technician reads them."""
    assert redact(f"RequestedAmount {amount} EUR") == f"RequestedAmount {amount} EUR"


def test_a_passphrase_field_leaves_the_rest_of_the_line_readable():
    """Taken to the line's end (the first fix for multi-word passphrases), a Password field
    ate a logged answer's Result and ErrorCondition, and a settings line's next setting (the
    review): its value ends where a field does."""
    answer = ('unusable answer: {"AdminResponse": {"Password": null, "Response": '
              '{"Result": "Failure", "ErrorCondition": "NotAllowed"}}}')
    cleaned = redact(answer)
    assert '"ErrorCondition": "NotAllowed"' in cleaned and '"Result": "Failure"' in cleaned
    cleaned = redact("key.passphrase=correct horse; battery staple")  # (all of it)
    assert "horse" not in cleaned and "staple" not in cleaned
    cleaned = redact("{'password': 'two words', 'user': 'till1'}")
    assert "two words" not in cleaned and "'user': 'till1'" in cleaned


@pytest.mark.parametrize("line, tail", [
    ("passphrase=open}sesame", "sesame"),
    ('password=ab, "cd', "cd"),
    ("Passphrase: one, 'two three", "two three"),
    ("key.password=swordfish&fish=sword", "fish=sword"),
    ("passphrase=null}sesame", "sesame"),
])
def test_an_unquoted_passphrase_is_redacted_to_the_line_end(line, tail):
    """A passphrase written bare (a key=value line, an exception text) has no quote to say
    where it ends: a `}`, `, "` or `&` in it may be its own, so the rest of the line goes
    with it (the tail leaked before). Only a JSON literal (null, true, false) ends where
    the document goes on."""
    cleaned = redact(line)
    assert tail not in cleaned, cleaned
    assert REDACTED in cleaned


@pytest.mark.parametrize("number", [
    4111111111111111, 5555555555554444.0, 4111111111111111e0, 41111111111111.11e2,
    4111111111111111111.0, -4111111111111111.0])
def test_a_card_number_sent_as_a_json_number_is_redacted_whatever_its_shape(number):
    """redact_json (what bridge/error and bridge/response echo of a register's JSON): a float
    with a card number's digits came back whole (the review of 2026-12-03), since the filter
    leaves decimals alone. Nested, it is redacted too."""
    assert redact_json(number) == REDACTED
    assert redact_json({"a": [1, {"b": number}]}) == {"a": [1, {"b": REDACTED}]}


@pytest.mark.parametrize("number", [12.5, 0.0, -3.14159, 1700000000000, 1700000000000.5, 42,
                                    True, None])
def test_amounts_counters_and_timestamps_in_json_stay_as_they_are(number):
    assert redact_json(number) == number
    assert redact_json([number]) == [number]


@pytest.mark.parametrize("text, expected", [
    ("1%\t+4111111111111111a", "1%\t+[redacted]a"),
    ("7,_41111111111111112D", "7,_[redacted]2D"),
])
def test_two_separators_in_a_row_before_a_glued_card_number_do_not_make_it_raise(text,
                                                                                 expected):
    """The review of 2026-12-03: an empty group between two separators made redact() raise
    IndexError, inside the log call that ran it (text a terminal sent could make a logging
    call fail)."""
    assert redact(text) == expected


def test_a_bug_in_the_filter_scrubs_every_digit_run_and_raises_nothing(monkeypatch):
    """redact() runs in every log call and on what is published: a bug met on odd text must
    fail neither, nor let the text out as it is."""
    import bridge.redaction as redaction

    def broken(text: str) -> str:
        raise IndexError("a bug")

    monkeypatch.setattr(redaction, "_redact", broken)
    assert redact("pan 4111 1111 1111 1111, ref 123456, till 12") == \
        "pan [redacted], ref [redacted], till 12"


def test_card_groups_joined_by_windows_line_ends_are_redacted():
    """Review rev7: the README promises groups joined by line ends; a terminal's text with
    CRLF (or a lone CR) between the groups passed the filter whole."""
    for separator in ("\r\n", "\r", "\n"):
        text = "Refused card " + separator.join(["5555", "5555", "5555", "4444"]) + " retry"
        assert redact(text) == f"Refused card {REDACTED} retry", repr(redact(text))
    kept = "line one\r\nline two 2026-12-03\r\n10:00 amount 12.50\r\n"
    assert redact(kept) == kept
