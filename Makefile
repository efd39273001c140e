# Two commands on a fresh machine with Python 3.11:
#   make demo   set up .venv and run the main job on the embedded default
#   make test   set up .venv and run the tests
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast test-netns lint clean

# constraints.txt: the exact versions the tests passed with (pyproject.toml gives ranges).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -c constraints.txt -e '.[dev,ingest]'
	$(BIN)/python -c "import sdofm, torch, ray, mlflow, zarr"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/sdofm demo configs/tune/dimming.yaml

# Both tiers, the Ray-free one first in its own session (a test there that starts Ray
# fails), then every Ray test; each prints its slowest tests.
test: setup
	$(BIN)/python -m pytest -q -m "not ray" --durations=10
	$(BIN)/python -m pytest -q -m ray --durations=30

# Every test that needs no Ray instance: the everyday loop, about a minute on 2 cores.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not ray"

# The shared-nothing two-node cluster (root: network and mount namespaces), about 8
# minutes; CI runs it after `make test`. Without root it skips and says why.
test-netns: setup
	SDOFM_NETNS_TESTS=1 $(BIN)/python -m pytest -q -rs --durations=10 tests/test_netns_cluster.py

lint: setup
	$(BIN)/ruff check sdofm tests
	$(BIN)/ruff format --check sdofm tests

clean:
	rm -rf data/cache mlflow.db ray_results
