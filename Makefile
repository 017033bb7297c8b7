# ssl_nb: `make test` (what CI runs), `make demo`, `make lab`. Every install step lives here.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.ssl_nb-installed
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
FMNIST_FILES := train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz
DEMO ?= sequencematch
# pytest processes (pytest-xdist, a test file per process): most of the suite is single-threaded (imports, subprocesses,
# papermill kernels), so two processes keep both cores busy
TEST_WORKERS ?= 2
DEMO_DIR := $(CURDIR)/runs/demo

.PHONY: setup data test demo lab export check-drift test-nbs test-py bench-kernels

$(STAMP): requirements.txt setup.py settings.ini
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

setup: $(STAMP)

# Fashion-MNIST, the embedded default: the Debian package dataset-fashion-mnist (installed when missing and apt is
# available); otherwise ssl_nb.data falls back to torchvision's download where there is internet.
data: setup
	@if ls $(addprefix $(FMNIST_DIR)/,$(FMNIST_FILES)) >/dev/null 2>&1; then echo "Fashion-MNIST: $(FMNIST_DIR)"; \
	elif command -v apt-get >/dev/null; then \
	  echo "Installing the Debian package dataset-fashion-mnist"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo -n ); \
	  $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; } || \
	  echo "apt-get failed: ssl_nb will try torchvision's download instead"; \
	fi
	@$(PY) -c "from ssl_nb.data import load_dataset; d = load_dataset('fashion_mnist', 'test'); print('Fashion-MNIST ok:', len(d), 'test images')"

check-drift: setup
	$(PY) tools/check_drift.py

test-nbs: setup data
	TRITON_INTERPRET=1 MPLBACKEND=Agg timeout 1800 $(BIN)/nbdev_test --n_workers 2 --timing

test-py: setup data
	TRITON_INTERPRET=1 MPLBACKEND=Agg timeout 1800 $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

test: check-drift test-nbs test-py

# The notebook's defaults set the CPU threads (1: see its run section); `make demo DEMO_DIR=...` writes elsewhere.
demo: setup data
	@mkdir -p $(DEMO_DIR) && date +%s > $(DEMO_DIR)/.demo_start
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/papermill nbs/$(DEMO).ipynb $(DEMO_DIR)/$(DEMO).ipynb -k python3 --cwd nbs \
	  -p run_dir $(DEMO_DIR) --log-output --progress-bar
	@$(PY) -m ssl_nb.cli summary $(DEMO_DIR)
	@echo "Output notebook: $(DEMO_DIR)/$(DEMO).ipynb   plots: $(DEMO_DIR)/plots/"
	@s=$$(( $$(date +%s) - $$(cat $(DEMO_DIR)/.demo_start) )); echo "Demo wall time (notebook and summary): $$((s / 60)) min $$((s % 60)) s"

lab: setup data
	$(BIN)/jupyter lab nbs

export: setup
	$(BIN)/nbdev_clean && $(BIN)/nbdev_export

bench-kernels: setup
	$(PY) benchmarks/kernels.py --out runs/bench
