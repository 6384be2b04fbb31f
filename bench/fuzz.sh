#!/usr/bin/env bash
# Fuzz every hypothesis test of the targets below (hypothesis at scale), for a given time each:
#   make fuzz FUZZ_SECONDS=600          each test of each target gets 600 s of its own
#   bench/fuzz.sh 30 tests/some_file.py only the targets named
# Targets: the three framer decoders, the message parser (and its JSON reader, orjson against
# the strict one), the decryptor, the MQTT request handler; their corpora start from the vendor
# fixtures. A whole file is one target and every hypothesis test in it (every parametrization)
# is fuzzed in turn; tests/fuzzing.py runs them and prints a summary, one line per test with
# its examples and time. It exits 1 unless every test ran and passed: a failure, a collection
# error, a target with no hypothesis test, a test that never ran, a run that had to be stopped
# all count.
# A failure prints the falsifying input and a reproduce blob; hypothesis also keeps it in
# .hypothesis/ and replays it first on the next run. Turn each one found into an @example(...)
# regression test beside its target.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-60}
shift $(( $# > 0 ? 1 : 0 ))
py=${PY:-$root/.venv/bin/python}
targets=(
  "$root/tests/test_framing_properties.py"
  "$root/tests/test_messages.py::test_parser_never_raises_anything_but_message_error"
  "$root/tests/test_messages.py::test_arbitrary_envelopes_parse_or_fail_cleanly_and_classify_without_raising"
  "$root/tests/test_messages.py::test_the_nesting_guard_agrees_with_the_true_depth"
  "$root/tests/test_json_reader.py"
  "$root/tests/test_crypto.py::test_decrypt_raises_only_crypto_errors_on_junk"
  "$root/tests/test_intake_fuzz.py"
  "$root/tests/test_session.py::test_invariants_hold_for_any_sequence_of_events"
)
if (( $# > 0 )); then
  targets=("$@")  # a target may carry pytest options: "tests/x.py -k name"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # the runner and its pytest plugin
exec "$py" -m tests.fuzzing "$seconds" "${targets[@]}"
