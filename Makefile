# One command each: `make test`, `make demo`. Both build the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo venv clean bench bench-targets bench-hostile fuzz soak

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,demo]'
	touch $@

test: venv
	$(PY) -m pytest -q

demo: venv
	$(PY) -m bridge demo

# Benchmarks against the physical limit (needs mosquitto); results in bench/results/latest.json.
# The broker runs with set_tcp_nodelay true, as examples/mosquitto/mosquitto.conf recommends.
bench: venv
	$(PY) bench/run.py --broker-nodelay

# What one piece of hostile input (floods of frame starts, resync candidates, text the
# card-data filter scans) costs the shared event loop, at 4, 16 and 64 KiB: about a minute.
bench-hostile: venv
	$(PY) -m bench.hostile --json bench/results/hostile-latest.json

# The targets judged over three rounds of section 1 (latency and baselines), about 12 minutes:
# a verdict that holds in every round is the one to quote on a VM whose speed varies.
bench-targets: venv
	$(PY) bench/run.py --broker-nodelay --sections latency --rounds 3 --fail-on-miss --output bench/results/targets-latest.json

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# Fuzz every hypothesis test of every target for FUZZ_SECONDS each (hypothesis at scale; the
# targets are TARGETS in tests/fuzzing.py). Failures are kept in .hypothesis/examples.
FUZZ_SECONDS ?= 60
fuzz: venv
	$(PY) -m tests.fuzzing $(FUZZ_SECONDS)

# The fault-injection soak: ~3 minutes, seed 1; `$(PY) bench/soak.py --help` for longer runs.
soak: venv
	$(PY) bench/soak.py
