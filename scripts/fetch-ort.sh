#!/usr/bin/env bash
# Fetches the ONNX Runtime CPU shared library from its PyPI wheel (the one place this machine can
# download it from), verifies the wheel's sha256, and unpacks the libraries into DEST.
#   scripts/fetch-ort.sh VERSION PLATFORM SHA256 DEST
# PLATFORM is a wheel platform tag, e.g. manylinux_2_28_x86_64 or manylinux_2_28_aarch64.
set -euo pipefail
version=$1 platform=$2 sha=$3 dest=$4
if [ -e "$dest/libonnxruntime.so" ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.11 --implementation cp --platform "$platform" \
  "onnxruntime==$version" -d "$tmp"
wheel=$(ls "$tmp"/onnxruntime-*.whl)
got=$(sha256sum "$wheel" | cut -d' ' -f1)
if [ "$got" != "$sha" ]; then
  echo "error: $(basename "$wheel") has sha256 $got, expected $sha; refusing to use it" >&2
  exit 1
fi
python3 - "$wheel" "$tmp/unpacked" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for n in z.namelist():
        if n.startswith("onnxruntime/capi/libonnxruntime") and ".so" in n:
            z.extract(n, sys.argv[2])
PY
mkdir -p "$dest.partial"
cp "$tmp"/unpacked/onnxruntime/capi/libonnxruntime* "$dest.partial/"
lib=$(cd "$dest.partial" && ls libonnxruntime.so.* | head -n1)
ln -sf "$lib" "$dest.partial/libonnxruntime.so"
rm -rf "$dest"
mv "$dest.partial" "$dest"
echo "ONNX Runtime $version ($platform) in $dest"
