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

test: venv
	$(PY) -m pytest -m "not slow" $(ARGS)

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
