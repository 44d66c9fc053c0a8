# absorb: the few entry points. `make demo` and `make test` are the two commands a newcomer needs;
# both set themselves up (ONNX Runtime library, Python venv for the export tests, cargo build).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

# ONNX Runtime CPU library, taken from the PyPI wheel (the only place this machine can reach).
ORT_VERSION ?= 1.31.1
ORT_DIR     ?= .ort/$(ORT_VERSION)
ORT_LIB     := $(ORT_DIR)/libonnxruntime.so

# The export venv is big (torch pulls CUDA wheels): create it once per requirements hash, outside the
# repo, and reuse it from every clone.
REQ_HASH := $(shell sha256sum export/requirements.txt | cut -c1-12)
VENV     ?= $(HOME)/.cache/absorb/venv-$(REQ_HASH)
PY       := $(VENV)/bin/python

.PHONY: venv pytest
venv: $(VENV)/.installed
$(VENV)/.installed: export/requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r export/requirements.txt
	touch $@

pytest: venv
	$(PY) -m pytest -q export/tests

ORT_SHA256_x86_64  := 5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f
ARCH := $(shell uname -m)

.PHONY: ort build demo test rust-test lint
ort: $(ORT_LIB)
$(ORT_LIB):
	scripts/fetch-ort.sh $(ORT_VERSION) manylinux_2_28_$(ARCH) $(ORT_SHA256_$(ARCH)) $(ORT_DIR)

build:
	cargo build --release

# The demo: a grid of digits from the bundled model.
demo: ort build
	mkdir -p out
	ORT_DYLIB_PATH=$(abspath $(ORT_LIB)) target/release/absorb generate --seed 7 --count 64 --out out/digits.png
	@echo "open out/digits.png"

rust-test: ort
	ORT_DYLIB_PATH=$(abspath $(ORT_LIB)) cargo test --release

lint:
	cargo fmt --check
	cargo clippy --release --all-targets -- -D warnings

test: lint rust-test pytest
