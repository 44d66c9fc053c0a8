#!/usr/bin/env bash
# Fetches an ONNX Runtime CPU shared library from a package registry, verifies the package's
# sha256, and unpacks the libraries into DEST (with a libonnxruntime.so symlink).
#   scripts/fetch-ort.sh VERSION ARCH SHA256 DEST [pypi|npm]      (ARCH: x86_64 or aarch64)
# pypi: the `onnxruntime` wheel, which carries libonnxruntime.so from 1.18/1.19 on.
# pypi-gpu: the `onnxruntime-gpu` wheel (x86_64 only; CUDA and TensorRT provider libraries beside it).
# npm:  Microsoft's `onnxruntime-node` package, which carries libonnxruntime.so.X for x64 and
#       arm64 also for older releases (1.16, 1.17) whose wheels link it into the Python module.
set -euo pipefail
version=$1 arch=$2 sha=$3 dest=$4 source=${5:-pypi}
if [ -e "$dest/libonnxruntime.so" ]; then exit 0; fi
if [ -z "$sha" ]; then
  echo "error: no pinned sha256 for onnxruntime $version ($source, $arch); add it to the Makefile" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/unpacked"
case "$source" in
  pypi|pypi-gpu)
    name=$([ "$source" = pypi-gpu ] && echo onnxruntime-gpu || echo onnxruntime)
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version 3.11 --implementation cp \
      --platform "manylinux_2_28_$arch" --platform "manylinux_2_27_$arch" \
      --platform "manylinux_2_17_$arch" --platform "manylinux2014_$arch" \
      "$name==$version" -d "$tmp"
    package=$(ls "$tmp"/onnxruntime*.whl)
    ;;
  npm)
    (cd "$tmp" && npm pack --silent "onnxruntime-node@$version" >/dev/null)
    package=$(ls "$tmp"/onnxruntime-node-*.tgz)
    ;;
  *) echo "error: unknown source $source (pypi or npm)" >&2; exit 1 ;;
esac
got=$(sha256sum "$package" | cut -d' ' -f1)
if [ "$got" != "$sha" ]; then
  echo "error: $(basename "$package") has sha256 $got, expected $sha; refusing to use it" >&2
  exit 1
fi
case "$source" in
  pypi|pypi-gpu)
    python3 - "$package" "$tmp/unpacked" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for n in z.namelist():
        if n.startswith("onnxruntime/capi/libonnxruntime") and ".so" in n:
            z.extract(n, sys.argv[2])
PY
    libdir="$tmp/unpacked/onnxruntime/capi"
    ;;
  npm)
    node_arch=$([ "$arch" = aarch64 ] && echo arm64 || echo x64)
    tar -xzf "$package" -C "$tmp/unpacked" --wildcards "package/bin/napi-v3/linux/$node_arch/libonnxruntime*"
    libdir="$tmp/unpacked/package/bin/napi-v3/linux/$node_arch"
    ;;
esac
if ! ls "$libdir"/libonnxruntime.so.* >/dev/null 2>&1; then
  echo "error: the $source package of onnxruntime $version has no libonnxruntime.so.*; use the npm source" >&2
  exit 1
fi
mkdir -p "$dest.partial"
cp "$libdir"/libonnxruntime* "$dest.partial/"
lib=$(cd "$dest.partial" && ls libonnxruntime.so.* | head -n1)
ln -sf "$lib" "$dest.partial/libonnxruntime.so"
rm -rf "$dest"
mv "$dest.partial" "$dest"
echo "ONNX Runtime $version ($arch, from $source) in $dest"
