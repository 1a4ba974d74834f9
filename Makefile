# The two commands of the README:
#   make demo   set up and run the local fleet demo
#   make test   set up and run every test
# Everything else here is what those two need.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test setup system-deps lint bench fuzz clean

demo: setup
	rm -rf demo-out
	$(BIN)/meshtrust demo --clusters 3 --duration 45 --rotate-root --workdir demo-out

test: setup system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

system-deps:
	scripts/system-deps

# Not part of the two README commands: the checks the tests also run, the benchmarks, and the
# long fuzzing run (make test runs the fuzz suites at 10,000 examples per target).
lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy src
	$(BIN)/lint-imports

bench: setup
	$(BIN)/python bench/issue.py
	$(BIN)/python bench/store.py
	$(BIN)/python bench/relay.py

# A million examples per fuzz target, a new seed each run: hours. FUZZ_EXAMPLES=N for another count.
fuzz: setup
	MESHTRUST_FUZZ=long MESHTRUST_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) \
		$(BIN)/python -m pytest tests/fuzz -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
