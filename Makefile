# Two commands set everything up on a fresh machine:
#   make demo   create .venv, install the pinned requirements, build the built-in demo dataset
#               (scikit-learn's digits in the Tiny-ImageNet layout) and train on it (~2 CPU minutes)
#   make test   the test suite (what CI runs)
#   make extras the optional packages: ONNX export (export.py); CI installs them
# and, with data/tiny-imagenet-200 in place:
#   make train ARGS="--arch resnet18 --batch_size 128 --lr_base 1e-3 --epochs 100"

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DATA ?= data/demo-digits
ARGS ?=

.PHONY: venv extras demo train test test-slow lint format clean-demo docker-smoke

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install -r requirements.txt
	touch $@

extras: $(VENV)/.extras

$(VENV)/.extras: $(VENV)/.installed requirements-extra.txt
	$(PY) -m pip install -r requirements-extra.txt
	touch $@

demo: venv
	$(PY) demo_data.py --out $(DEMO_DATA)
	$(PY) main.py --config configs/demo.yaml --data_dir $(DEMO_DATA) $(ARGS)

train: venv
	$(PY) main.py $(ARGS)

# The suite in TEST_WORKERS processes (pytest-xdist), each torch (and every process a test starts) on one
# thread: most of a test's time is a single-threaded start-up, so two processes on two cores take ~0.7x
# the time of one process with two threads. One worker per core, four at most; TEST_WORKERS=0: one process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ "$$n" -gt 4 ] && n=4; echo $$n)
test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "not slow" -n $(TEST_WORKERS) $(ARGS)

test-slow: venv
	$(PY) -m pytest -m slow $(ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) tools/lint_imports.py
	$(VENV)/bin/shellcheck $(wildcard docker/*.sh bench/*.sh data/*.sh) .ci/run
	$(VENV)/bin/hadolint docker/Dockerfile

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean-demo:
	rm -rf $(DEMO_DATA)

# The Docker image end to end, CPU only: base (BASE_IMAGE, else the local stand-in), image, one demo
# epoch in the container, outputs checked on the host (docs/DOCKER.md; needs a Docker daemon).
docker-smoke:
	bash docker/smoke.sh
