"""How hard the hypothesis targets push: modest in `make test`, as long as you like in
`make fuzz` (which sets POI_BRIDGE_FUZZ=1 and bounds each target's run with a timeout)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

FUZZING = os.environ.get("POI_BRIDGE_FUZZ") == "1"


def fuzz_settings(examples: int) -> settings:
    """`examples` in a normal run; effectively unbounded under `make fuzz`."""
    return settings(
        max_examples=10**9 if FUZZING else examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                               HealthCheck.data_too_large],
        print_blob=True,  # a failure prints the blob to paste into @reproduce_failure
    )
