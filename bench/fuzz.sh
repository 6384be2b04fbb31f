#!/usr/bin/env bash
# Run every fuzz target (hypothesis at scale) for a given time each:
#   make fuzz FUZZ_SECONDS=600
# Targets: the three framer decoders, the message parser, the decryptor, the MQTT request
# handler; their corpora start from the vendor fixtures. A failure prints the falsifying
# input and a reproduce blob; hypothesis also keeps it in .hypothesis/ and replays it first
# on the next run. Turn each one found into an @example(...) regression test beside its target.
set -u
seconds=${1:-60}
py=${PY:-.venv/bin/python}
targets=(
  "tests/test_framing_properties.py"
  "tests/test_messages.py::test_parser_never_raises_anything_but_message_error"
  "tests/test_messages.py::test_arbitrary_envelopes_parse_or_fail_cleanly_and_classify_without_raising"
  "tests/test_messages.py::test_the_nesting_guard_agrees_with_the_true_depth"
  "tests/test_crypto.py::test_decrypt_raises_only_crypto_errors_on_junk"
  "tests/test_intake_fuzz.py"
)
status=0
for target in "${targets[@]}"; do
  echo "== fuzzing $target for ${seconds}s"
  # shellcheck disable=SC2086 # a target may carry pytest options
  POI_BRIDGE_FUZZ=1 timeout -s INT "$seconds" "$py" -m pytest -q -x $target
  rc=$?
  case $rc in
    0|124|2) echo "   no failure found in ${seconds}s" ;;  # done, or stopped by the time limit
    *) echo "!! $target found a failure (exit $rc)"; status=1 ;;
  esac
done
exit $status
