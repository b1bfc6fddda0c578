# Signal — build, test, run. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

GO        ?= go
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -X github.com/signal-p2p/signal/internal/version.Version=$(VERSION)
CACHE     := $(CURDIR)/.cache
BIN       := $(CURDIR)/bin
# MinIO has no semver tags; this pseudo-version is the 2026-02-12 release commit.
MINIO_VERSION := v0.0.0-20260212201848-7aac2a2c5b7c
MINIO     := $(CACHE)/bin/minio
APT_PKGS  := libopenblas-dev libopenblas0-pthread libdnnl-dev python3-torch python3-numpy python3-venv chromium
# Debian's python3-torch installs for the system interpreter, not a pyenv one.
PYTHON    ?= /usr/bin/python3

# Engine packages (and export, which runs the engine) are compute-bound and
# single-owner: the race detector costs them 10x and finds nothing;
# everything concurrent runs under -race.
RACE_PKGS  = $(shell $(GO) list ./... | grep -v -e '/trainer' -e '/export$$')
PLAIN_PKGS = $(shell $(GO) list ./... | grep -e '/trainer' -e '/export$$')

# go-nvml's cgo headers warn about deprecated NVML calls on every cold build.
export CGO_CFLAGS       ?= -O2 -Wno-deprecated-declarations
export SIGNAL_MINIO_BIN := $(MINIO)
export SIGNAL_PYTHON    := $(PYTHON)
# Tests leave screenshots and other things worth a look here (the dashboard's).
export SIGNAL_ARTIFACTS ?= $(CACHE)/artifacts

.PHONY: help deps apt-deps minio pyenv llamacpp build test test-go test-python bench lint run clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

deps: apt-deps minio pyenv llamacpp ## install what builds and tests need (apt packages, MinIO, the Python test environment, llama.cpp)

apt-deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# The pinned Python test environment (torch 2.x, transformers, peft; about
# 5.6 GB once, in ~/.cache/signal, keyed by scripts/pyenv.lock's hash).
pyenv: apt-deps
	@scripts/pyenv.sh >/dev/null

# The GGUF consumers the export tests judge with: llama.cpp (npm's
# node-llama-cpp, CPU build) and the gguf Python package (about 90 MB once,
# in ~/.cache/signal).
llamacpp: pyenv
	@scripts/llamacpp.sh >/dev/null

minio: $(MINIO)
$(MINIO):
	@echo "building MinIO $(MINIO_VERSION) with go install (a few minutes, once)"
	@mkdir -p $(CACHE)/bin
	GOBIN=$(CACHE)/bin CGO_ENABLED=0 $(GO) install github.com/minio/minio@$(MINIO_VERSION)

build: apt-deps ## build bin/signal
	@mkdir -p $(BIN)
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/signal ./cmd/signal

test: deps test-go test-python ## run every test: unit, integration, Python SDK

test-go:
	$(GO) vet ./...
	SIGNAL_HF_PYTHON=$$(scripts/pyenv.sh) $(GO) test -race -count=1 -timeout 30m $(RACE_PKGS)
	SIGNAL_HF_PYTHON=$$(scripts/pyenv.sh) SIGNAL_LLAMACPP=$$(scripts/llamacpp.sh) $(GO) test -count=1 -timeout 30m $(PLAIN_PKGS)

test-python: build
	@if [ -d python/tests ]; then cd python && SIGNAL_BIN=$(BIN)/signal $(PYTHON) -m unittest discover -v -s tests 2>&1; fi

bench: deps build ## print benchmark figures against the peers named in the issues
	@if [ -x scripts/bench.sh ]; then scripts/bench.sh; else echo "no benchmarks yet"; fi

lint: ## go vet, gofmt
	$(GO) vet ./...
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

run: apt-deps build ## start a local testnet on the embedded model and run the example end to end
	@if [ -x scripts/run.sh ]; then scripts/run.sh; else $(BIN)/signal version; echo "make run: the testnet is not built yet; this prints the version only"; fi

clean: ## remove build outputs (keeps the MinIO cache)
	rm -rf $(BIN)
