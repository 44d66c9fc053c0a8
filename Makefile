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

# export/tests/test_images.py trains a tiny bundle and measures it with the absorb binary.
pytest: venv ort build
	ABSORB_BIN=$(abspath target/release/absorb) ORT_DYLIB_PATH=$(abspath $(ORT_LIB)) $(PY) -m pytest -q export/tests

# The OpenAI images API driven by the official `openai` client (tests/openai): a small venv of its
# own (the client and pytest, pinned), not the export venv's torch.
OPENAI_REQ   := tests/openai/requirements.txt
OPENAI_VENV  ?= $(HOME)/.cache/absorb/openai-venv-$(shell sha256sum $(OPENAI_REQ) | cut -c1-12)
.PHONY: openai-test
$(OPENAI_VENV)/.installed: $(OPENAI_REQ)
	python3 -m venv $(OPENAI_VENV)
	$(OPENAI_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r $(OPENAI_REQ)
	touch $@
openai-test: $(OPENAI_VENV)/.installed ort build
	ABSORB_BIN=$(abspath target/release/absorb) ORT_DYLIB_PATH=$(abspath $(ORT_LIB)) \
	  $(OPENAI_VENV)/bin/python -m pytest -q tests/openai

ARCH := $(shell uname -m)
# sha256 of each pinned wheel (onnxruntime-VERSION-cp311-...-ARCH.whl on PyPI).
ORT_SHA256_1.31.1_x86_64 := 5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f
ORT_SHA256_1.32.0_x86_64 := 5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d
# Wheels before 1.18/1.19 link ONNX Runtime into the Python module; their shared library comes from
# Microsoft's onnxruntime-node npm package instead (one tarball for x86_64 and aarch64).
ORT_SOURCE_1.17.3 := npm
ORT_SOURCE_1.16.3 := npm
ORT_SHA256_1.17.3_x86_64 := fd586d4ab53d89fdade19ffcc75b208fd66ab417b247cb6ae299be1bb40d76be
ORT_SHA256_1.16.3_x86_64 := 5896383cd3449c5838a46fcf1490865ab90487773a3bb018ea6a5f12b17e2667
# onnxruntime-gpu (x86_64, CUDA 13 / TensorRT 10): only to test that GPU providers fail loudly here.
ORT_SOURCE_gpu-1.31.1 := pypi-gpu
ORT_SHA256_gpu-1.31.1_x86_64 := e26c475fe361b2015f45b4b824bd13f0bb20204e59b62814e6f0acd5f3d491a6

.PHONY: ort build demo test rust-test lint
ort: $(ORT_LIB)
$(ORT_LIB):
	scripts/fetch-ort.sh $(ORT_VERSION) $(ARCH) "$(ORT_SHA256_$(ORT_VERSION)_$(ARCH))" $(ORT_DIR) $(or $(ORT_SOURCE_$(ORT_VERSION)),pypi)

# The shipped binary has the CUDA and TensorRT providers compiled in (they cost nothing without a
# GPU: the provider libraries come with the ONNX Runtime build that is loaded at run time).
FEATURES := cuda,tensorrt
build:
	cargo build --release --features $(FEATURES)

# The demo: a grid of digits, and a scene 4x wider and 2x taller than its model was trained on.
demo: ort build
	mkdir -p out
	ORT_DYLIB_PATH=$(abspath $(ORT_LIB)) target/release/absorb generate --seed 7 --count 64 --out out/digits.png
	ORT_DYLIB_PATH=$(abspath $(ORT_LIB)) target/release/absorb generate --model models/scenes --seed 7 \
	  --size 128x64 --count 4 --columns 1 --out out/scenes.png
	@echo "open out/digits.png out/scenes.png"

# ONNX Runtime compatibility: the oldest supported library (API level 17), the newest, and one
# that is too old and must be refused. Kept under .ort/compat/ so the binary's own search (which
# picks the newest .ort/<version>/) never lands on them.
ORT_OLDEST  := 1.17.3
ORT_NEWEST  := 1.32.0
ORT_TOO_OLD := 1.16.3
compat_lib = .ort/compat/$(1)/libonnxruntime.so
.ort/compat/%/libonnxruntime.so:
	scripts/fetch-ort.sh $(patsubst gpu-%,%,$*) $(ARCH) "$(ORT_SHA256_$*_$(ARCH))" .ort/compat/$* $(or $(ORT_SOURCE_$*),pypi)

.PHONY: ort-compat
ort-compat: $(call compat_lib,$(ORT_OLDEST)) $(call compat_lib,$(ORT_NEWEST)) $(call compat_lib,$(ORT_TOO_OLD)) \
	$(call compat_lib,gpu-$(ORT_VERSION))

rust-test: ort ort-compat
	ABSORB_TOO_OLD_ORT=$(abspath $(call compat_lib,$(ORT_TOO_OLD))) \
	  ABSORB_GPU_ORT=$(abspath $(call compat_lib,gpu-$(ORT_VERSION))) \
	  ORT_DYLIB_PATH=$(abspath $(ORT_LIB)) cargo test --release --features $(FEATURES)
	@# Against the oldest and newest library: the same suites, byte-for-byte goldens included, but
	@# the sampler quality sweep (2 minutes; the sampler's, not the library's: equal bytes imply it).
	@for v in $(ORT_OLDEST) $(ORT_NEWEST); do \
	  echo "== integration tests against ONNX Runtime $$v"; \
	  ORT_DYLIB_PATH=$(abspath .ort/compat)/$$v/libonnxruntime.so \
	    cargo test --release --features $(FEATURES) --test cli --test pipeline -- \
	    --skip every_sampler_meets_the_bar_at_its_documented_steps || exit 1; \
	done

lint:
	cargo fmt --check
	cargo fmt --check --manifest-path fuzz/Cargo.toml
	cargo clippy --release --all-targets --features $(FEATURES) -- -D warnings
	cargo clippy --release --all-targets -- -D warnings

# Cross-compilation for Jetson (aarch64, glibc <= 2.31 so the binary starts on JetPack 5), without
# Docker: cargo-zigbuild and zig from PyPI, the Rust aarch64 std from rustup.
CROSS_TARGET := aarch64-unknown-linux-gnu
CROSS_GLIBC  := 2.31
CROSS_BIN    := target/$(CROSS_TARGET)/release/absorb
ZIG_VENV     := $(HOME)/.cache/absorb/zig-0.17.0
ORT_SHA256_1.31.1_aarch64 := da05378364c44d4407e463982d2bf8d5e4cfea873283757e48beeb41df97b7f3
ORT_ARM_LIB  := .ort/aarch64/$(ORT_VERSION)/libonnxruntime.so

.PHONY: cross cross-tools cross-test goldens-avx2
cross-tools: $(ZIG_VENV)/.installed
	rustup target list --installed | grep -qx $(CROSS_TARGET) || rustup target add $(CROSS_TARGET)
$(ZIG_VENV)/.installed:
	python3 -m venv $(ZIG_VENV)
	$(ZIG_VENV)/bin/python -m pip install --quiet --disable-pip-version-check cargo-zigbuild==0.24.0 ziglang==0.17.0
	touch $@

cross: cross-tools
	PATH=$(ZIG_VENV)/bin:$$PATH cargo zigbuild --release --target $(CROSS_TARGET).$(CROSS_GLIBC) --features cuda,tensorrt
	@newest=$$(readelf --dyn-syms -W $(CROSS_BIN) | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1); \
	if [ "$$(printf '%s\n%s\n' "$$newest" "$(CROSS_GLIBC)" | sort -V | tail -n1)" != "$(CROSS_GLIBC)" ]; then \
	  echo "error: $(CROSS_BIN) needs GLIBC_$$newest, more than $(CROSS_GLIBC) (JetPack 5)"; exit 1; \
	fi; echo "$(CROSS_BIN): aarch64, needs at most GLIBC_$$newest, features cuda+tensorrt"

$(ORT_ARM_LIB):
	scripts/fetch-ort.sh $(ORT_VERSION) aarch64 "$(ORT_SHA256_$(ORT_VERSION)_aarch64)" .ort/aarch64/$(ORT_VERSION)

# The aarch64 build under qemu-user must give byte-identical PNGs to the x86-64 build.
cross-test: cross build ort $(ORT_ARM_LIB)
	command -v qemu-aarch64 >/dev/null && [ -e /usr/aarch64-linux-gnu/lib/libstdc++.so.6 ] || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user libc6-arm64-cross libstdc++6-arm64-cross; }
	scripts/cross-test.sh target/release/absorb $(CROSS_BIN) $(abspath $(ORT_ARM_LIB)) $(abspath $(ORT_LIB)) models/digits

# The stages of `make test`, one after another; scripts/stages.sh prints each one's time at the end.
TEST_STAGES := lint rust-test fuzz-smoke browser-test pytest openai-test cross-test verify-unit verify-k8s
test:
	scripts/stages.sh $(MAKE) $(TEST_STAGES)

# The golden bytes of the AVX2 family (x86-64 without AVX-512: tests/golden/*-x86_64-avx2.json) on
# any x86-64 machine: the golden tests run their absorb processes under qemu-user emulating an AMD
# EPYC Rome (AVX2 and FMA, no AVX-512), whose kernels ONNX Runtime picks by CPUID (checked: it
# reproduces, hash for hash, what an AVX2 EPYC wrote, wide.png included, which AVX-512 rounds
# differently). Needs qemu 7.2 or newer (AVX2 in its emulator; the test checks the family the binary
# sees). About 10 minutes. Compares; `make goldens-avx2 GOLDEN_WRITE=1` rewrites the files (after a
# change meant to alter bytes, e.g. a retrained bundle).
goldens-avx2: ort
	command -v qemu-x86_64 >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user; }
	ABSORB_TEST_RUNNER="qemu-x86_64 -cpu EPYC-Rome" ABSORB_TEST_GOLDEN_KEY=x86_64-avx2 \
	  $(if $(filter 1,$(GOLDEN_WRITE)),ABSORB_GOLDEN_WRITE=1) \
	  ORT_DYLIB_PATH=$(abspath $(ORT_LIB)) cargo test --release --features $(FEATURES) \
	  --test cli --test server golden_bytes -- --test-threads 1

# The page of `absorb serve` in a real browser (tests/browser/ui.mjs): Debian's Chromium (apt, as
# root) driven headless by playwright-core (npm, pinned by tests/browser/package-lock.json, into
# ~/.cache/absorb/), which never downloads a browser of its own.
BROWSER_LOCK := tests/browser/package-lock.json
BROWSER_DIR  ?= $(HOME)/.cache/absorb/browser-$(shell sha256sum $(BROWSER_LOCK) | cut -c1-12)
CHROMIUM     ?= /usr/bin/chromium

.PHONY: browser-tools browser-test
browser-tools: $(BROWSER_DIR)/.installed
	command -v $(CHROMIUM) >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core; }
$(BROWSER_DIR)/.installed: $(BROWSER_LOCK) tests/browser/package.json
	mkdir -p $(BROWSER_DIR)
	cp tests/browser/package.json $(BROWSER_LOCK) $(BROWSER_DIR)/
	cd $(BROWSER_DIR) && npm ci --no-audit --no-fund --silent
	touch $@

browser-test: browser-tools ort build
	PLAYWRIGHT_DIR=$(BROWSER_DIR) CHROMIUM=$(CHROMIUM) ORT_DYLIB_PATH=$(abspath $(ORT_LIB)) \
	  node tests/browser/ui.mjs $(abspath target/release/absorb) $(abspath models/digits) $(abspath models/scenes)

# Fuzzing (fuzz/, scripts/fuzz.sh): cargo-fuzz on a pinned nightly, both installed here. The
# build lives outside the clone so that its dependencies (3.5 minutes here) are built once per
# machine; absorb itself is rebuilt every time (about a minute).
FUZZ_TOOLCHAIN  := nightly-2026-05-20
CARGO_FUZZ      := 0.13.1
FUZZ_TARGET_DIR ?= $(HOME)/.cache/absorb/fuzz-target
FUZZ_SECONDS    ?= 60
FUZZ_ENV        := FUZZ_TOOLCHAIN=$(FUZZ_TOOLCHAIN) FUZZ_TARGET_DIR=$(FUZZ_TARGET_DIR) FUZZ_TARGETS="$(FUZZ_TARGETS)"

.PHONY: fuzz fuzz-smoke fuzz-tools
fuzz-tools:
	rustup toolchain list | grep -q '^$(FUZZ_TOOLCHAIN)' || rustup toolchain install $(FUZZ_TOOLCHAIN) --profile minimal
	cargo fuzz --version 2>/dev/null | grep -qx 'cargo-fuzz $(CARGO_FUZZ)' || cargo install --locked cargo-fuzz --version $(CARGO_FUZZ)

# Every target (or those in FUZZ_TARGETS) for FUZZ_SECONDS, one at a time.
fuzz: fuzz-tools
	$(FUZZ_ENV) scripts/fuzz.sh $(FUZZ_SECONDS) 1

# The smoke run of `make test`: 20 s per target, two at a time.
fuzz-smoke: fuzz-tools
	$(FUZZ_ENV) scripts/fuzz.sh 20 2

# deploy/Containerfile and deploy/k8s/*.yaml, offline (scripts/verify-deploy.py): strict schema
# validation with the schemas kubernetes-validate carries, cross-checks between the files,
# deliberately broken copies that must be rejected, and the containers' own args run by the built
# binary on the CPU. Its own venv, every wheel pinned by sha256.
K8S_REQ  := scripts/k8s-requirements.txt
K8S_VENV ?= $(HOME)/.cache/absorb/k8s-$(shell sha256sum $(K8S_REQ) | cut -c1-12)
$(K8S_VENV)/.installed: $(K8S_REQ)
	python3 -m venv $(K8S_VENV)
	$(K8S_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes \
	  --only-binary=:all: -r $(K8S_REQ)
	touch $@

.PHONY: verify-k8s
verify-k8s: $(K8S_VENV)/.installed ort build
	ABSORB_BIN=target/release/absorb ORT_DYLIB_PATH=$(abspath $(ORT_LIB)) $(K8S_VENV)/bin/python scripts/verify-deploy.py

# systemd-analyze verify on deploy/absorb.service exactly as shipped, in a scratch root holding the
# unit, the host's system units and a stub /usr/local/bin/absorb (verify insists that ExecStart
# exists). Any warning fails. Installs systemd's tools if missing, or skips saying why.
.PHONY: verify-unit
verify-unit:
	@if ! command -v systemd-analyze >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; \
	fi
	@if ! command -v systemd-analyze >/dev/null; then \
	  echo "verify-unit: skipped: systemd-analyze is missing and could not be installed (needs root and apt-get)"; \
	  exit 0; \
	fi; \
	units=$$(for d in /usr/lib/systemd/system /lib/systemd/system; do [ -d $$d ] && echo $$d && break; done); \
	root=$$(mktemp -d); trap 'rm -rf "$$root"' EXIT; \
	mkdir -p "$$root/usr/local/bin" "$$root/etc/systemd/system" "$$root/usr/lib/systemd/system"; \
	printf '#!/bin/sh\n' > "$$root/usr/local/bin/absorb"; chmod +x "$$root/usr/local/bin/absorb"; \
	cp -r "$$units/." "$$root/usr/lib/systemd/system/"; \
	cp deploy/absorb.service "$$root/etc/systemd/system/"; \
	out=$$(systemd-analyze verify --root="$$root" /etc/systemd/system/absorb.service 2>&1) || { echo "$$out"; exit 1; }; \
	if [ -n "$$out" ]; then echo "$$out"; echo "verify-unit: systemd-analyze warned (above)"; exit 1; fi; \
	echo "verify-unit: deploy/absorb.service verifies ($$(systemd-analyze --version | head -n1))"

# Reference peers (export/reference.py): the paper's sampler in torch eager (a) and in a Python loop
# over onnxruntime (b), interleaved with absorb bench (c) on the same bundle and settings. Numbers
# only; not part of `make test`. bench-paper exports seeded random churches-size weights (~55 s,
# 560 MB) into the ignored bench-models/, at few steps so the whole run takes a few minutes.
.PHONY: bench-reference bench-paper
bench-reference: ort build venv
	ORT_DYLIB_PATH=$(abspath $(ORT_LIB)) $(PY) -m export reference --bundle models/digits --count 16 --reps 3

PAPER_BUNDLE := bench-models/churches
PAPER_STEPS  ?= 8
PAPER_COUNT  ?= 2
$(PAPER_BUNDLE)/model.json: | venv
	$(PY) -m export official --random-init --seed 0 --preset churches --out $(PAPER_BUNDLE)
$(PAPER_BUNDLE)/transformer.int8.onnx: | $(PAPER_BUNDLE)/model.json
	$(PY) -m export variants --bundle $(PAPER_BUNDLE) --only int8 --rows 16 --bar 0.85
# The cached-attention graph of a paper-size bundle made before exporters wrote it.
$(PAPER_BUNDLE)/cache.json: | $(PAPER_BUNDLE)/model.json
	$(PY) -m export cache --bundle $(PAPER_BUNDLE)
PAPER_REPS   ?= 2
PAPER_THREADS ?= 1
# Cached attention against exact mode: the paper's sampler at S = 256, one image, both cores,
# interleaved pairs (scripts/cache-speed.py; about 15 minutes with the default 2 pairs).
PAPER_CACHE ?= 8
PAPER_CACHE_PAIRS ?= 2
bench-paper: ort build venv $(PAPER_BUNDLE)/transformer.int8.onnx $(PAPER_BUNDLE)/cache.json
	@for v in "" "--variant int8"; do \
	  ORT_DYLIB_PATH=$(abspath $(ORT_LIB)) $(PY) -m export reference --bundle $(PAPER_BUNDLE) \
	    --steps $(PAPER_STEPS) --count $(PAPER_COUNT) --reps $(PAPER_REPS) --threads $(PAPER_THREADS) $$v \
	    || exit 1; echo; \
	done
	ORT_DYLIB_PATH=$(abspath $(ORT_LIB)) python3 scripts/cache-speed.py --bundle $(PAPER_BUNDLE) --steps 256 \
	  --cache $(PAPER_CACHE) --pairs $(PAPER_CACHE_PAIRS) --threads 2

# The int8 variant's speed per transformer call against fp32 at paper size, 8 interleaved pairs
# of `absorb bench` runs (about 5 minutes): the README's "The int8 variant and your CPU".
.PHONY: bench-variant-speed
bench-variant-speed: ort build $(PAPER_BUNDLE)/transformer.int8.onnx
	ORT_DYLIB_PATH=$(abspath $(ORT_LIB)) python3 scripts/variant-speed.py --bundle $(PAPER_BUNDLE) --pairs 8 --threads 2

# Soak and overload (scripts/soak.py): the service at twice its measured capacity for SOAK_SECONDS
# with valid, bad, hung-up and slow clients, then SIGTERM under load. Prints figures; not in CI.
SOAK_SECONDS ?= 600
.PHONY: soak
soak: ort build
	ORT_DYLIB_PATH=$(abspath $(ORT_LIB)) python3 scripts/soak.py --seconds $(SOAK_SECONDS)

# The README's performance table: the paper's S = 256, one image, both cores (about 6 minutes).
.PHONY: bench-paper-256
bench-paper-256:
	$(MAKE) bench-paper PAPER_STEPS=256 PAPER_COUNT=1 PAPER_REPS=1 PAPER_THREADS=2

# Train models/emoji (issue 40): hours on a 2-core CPU, so it checkpoints inside every stage and
# goes on where it stopped (the same bytes as a run that never stopped). EMOJI_MINUTES=N stops it at a
# checkpoint after N minutes of training; run the target again to go on. Run nothing heavy alongside.
# When training ends, the int8 and fp16 variants are written and measured (export/variants.py).
# The checkpoint lives in the repository (export/checkpoints/, committed at pauses) because the
# machines a run spans do not share a disk: a fresh clone goes on from the last committed pause.
EMOJI_MINUTES ?= 0
EMOJI_CHECKPOINT ?= export/checkpoints/emoji-seed0.pt
.PHONY: train-emoji
train-emoji: venv ort build
	ABSORB_BIN=$(abspath target/release/absorb) ORT_DYLIB_PATH=$(abspath $(ORT_LIB)) \
	  $(PY) -m export train-emoji --out models/emoji --resume --minutes $(EMOJI_MINUTES) \
	  --checkpoint $(EMOJI_CHECKPOINT)
	$(PY) -m export variants --bundle models/emoji

# The README's pictures: the reverse process, a 4-wide grid, outpainting (digits bundle); the scenes
# bundle's wide images and one held-out crop of each source outpainted (the split is fixed).
SCENE_CROPS := 004_brick 003_grass 002_gravel 000_hubble_deep_field
.PHONY: docs-pictures
docs-pictures: ort build
	mkdir -p out
	ORT_DYLIB_PATH=$(abspath $(ORT_LIB)) target/release/absorb generate --seed 3 --count 4 --steps 32 \
	  --frames docs/reverse.gif -o out/reverse-final.png
	ORT_DYLIB_PATH=$(abspath $(ORT_LIB)) target/release/absorb generate --seed 11 --grid 8x32 --count 4 \
	  --columns 1 -o docs/wide.png
	cp models/digits/eval/heldout/005_0.png docs/outpaint-in.png
	for s in 1 2 3; do ORT_DYLIB_PATH=$(abspath $(ORT_LIB)) target/release/absorb outpaint \
	  --image docs/outpaint-in.png --extend right=16,down=16 --seed $$s -o docs/outpaint-$$s.png || exit 1; done
	@# the scenes bundle: wide images from overlapping windows, a held-out crop outpainted on all sides
	ORT_DYLIB_PATH=$(abspath $(ORT_LIB)) target/release/absorb generate --model models/scenes --seed 7 \
	  --size 128x64 --count 4 --columns 2 -o docs/scenes-wide.png
	for f in $(SCENE_CROPS); do cp models/scenes/eval/heldout/$$f.png docs/scenes-in-$$f.png; \
	  ORT_DYLIB_PATH=$(abspath $(ORT_LIB)) target/release/absorb outpaint --model models/scenes \
	  --image docs/scenes-in-$$f.png --extend left=16,right=16,up=16,down=16 --seed 1 \
	  -o docs/scenes-out-$$f.png || exit 1; done

# The quality-versus-cost frontier (README "Cached attention"): every sampler, step count and cache
# schedule on a bundle (FRONTIER_BUNDLE, default digits), judged by its eval classifier or judge,
# with the threshold samplers also at 0.5 and 0.7; docs/frontier-NAME.md is the table.
FRONTIER_BUNDLE ?= models/digits
FRONTIER_NAME = $(notdir $(FRONTIER_BUNDLE))
FRONTIER_ARGS ?= --steps 8,16,64 --cache off,2,4,8 --count 256
.PHONY: frontier
frontier: ort build
	mkdir -p out
	ORT_DYLIB_PATH=$(abspath $(ORT_LIB)) target/release/absorb eval --model $(FRONTIER_BUNDLE) \
	  --samplers absorbing,maskgit,halton,threshold,maskgit-threshold $(FRONTIER_ARGS) --json out/frontier-$(FRONTIER_NAME).json
	for p in 0.5 0.7; do ORT_DYLIB_PATH=$(abspath $(ORT_LIB)) target/release/absorb eval \
	  --model $(FRONTIER_BUNDLE) --samplers threshold,maskgit-threshold --threshold $$p $(FRONTIER_ARGS) \
	  --json out/frontier-$(FRONTIER_NAME)-t$$p.json || exit 1; done
	python3 scripts/frontier-table.py out/frontier-$(FRONTIER_NAME)*.json > docs/frontier-$(FRONTIER_NAME).md

# Quality vs steps per sampler on the digits bundle, judged by its eval classifier (README table).
.PHONY: quality-table
quality-table: ort build
	ORT_DYLIB_PATH=$(abspath $(ORT_LIB)) target/release/absorb eval --model models/digits \
	  --samplers absorbing,even,maskgit --steps 2,4,8,16,32,64 --count 256 --json out/quality-table.json
