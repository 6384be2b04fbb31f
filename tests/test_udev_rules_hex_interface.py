"""ID_USB_INTERFACE_NUM is the kernel's bInterfaceNumber, printed "%02x" (hex): interface 10
is "0a". 70-poi-bridge.rules then names the port /dev/poi/<vendor>-<serial>-if0a, but
parse_poi_name only takes -if[0-9]{2} as the interface (review rv26)."""

from __future__ import annotations

from bridge.config import parse_config
from bridge.daemon.udev_rules import parse_poi_name, render_rules, rules_problems


def test_a_hex_interface_number_is_the_interface_not_part_of_the_serial() -> None:
    name = parse_poi_name("/dev/poi/ingenico-ABC123-if0a")
    assert name is not None
    assert (name.serial, name.interface) == ("ABC123", "0a"), name


def test_the_rule_for_it_matches_that_device() -> None:
    config = parse_config({"terminals": [{"poi_id": "Move5000-1", "link": {
        "kind": "serial", "device": "/dev/poi/ingenico-ABC123-if0a"}}]})
    text = render_rules(config)
    assert rules_problems(config) == []
    assert 'ENV{ID_SERIAL_SHORT}=="ABC123"' in text, text
    assert 'ENV{ID_USB_INTERFACE_NUM}=="0a"' in text, text
