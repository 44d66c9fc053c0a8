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
