"""bench/io_costs.py (section 4c of `make bench`) runs against the daemon's own code: an
import it relies on that is renamed must fail here, not in the next `make bench`."""

from __future__ import annotations

from bench import io_costs


def test_section_4c_measures_every_read_path_and_the_puback_handling():
    result = io_costs.run(0.2)
    reads = {row["what"]: row for row in result["reads"]}
    assert set(reads) == {"SerialTransport.read()", "SerialTransport.deliver()",
                          "bare reader callback (floor)"}
    assert all(row["events"] > 0 and row["us_total"] > 0 for row in reads.values())
    pubacks = [row["what"] for row in result["pubacks"] if row["us_total"] > 0]
    assert pubacks == ["PUBACK, paho's decoder", "PUBACK, the daemon's short path",
                       "after it, paho's scan (200 in flight)", "after it, the daemon's check"]
