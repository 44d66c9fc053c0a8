"""Tests of variants.py on a small random bundle: files, model.json, the I/O contract, agreement.

    python -m pytest -q export/tests/test_variants.py

Measured when written (digits_shape.json, random init, seed 0; 16 partially masked rows): int8
argmax agreement 0.977, mean KL 1.2e-5; fp16 0.998, 7e-9. Random-init logits are nearly flat
(std ~0.22 over 64 codes), so argmax is a harsher test here than on a trained model.
"""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[2]
DIGITS_SHAPE = Path(__file__).with_name("digits_shape.json")


def run(*args, check=True):
    out = subprocess.run([sys.executable, "-m", "export", *map(str, args)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr
    return out


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A function returning a new copy of one exported random bundle (exported once)."""
    base = tmp_path_factory.mktemp("variants") / "base"
    run("official", "--random-init", "--hparams", DIGITS_SHAPE, "--out", base, "--steps", "16")
    n = iter(range(100))
    return lambda: Path(shutil.copytree(base, base.with_name(f"b{next(n)}")))


@pytest.fixture(scope="module")
def bundle(fresh):
    b = fresh()
    out = run("variants", "--bundle", b)
    assert "transformer.int8.onnx" in out.stdout and "transformer.fp16.onnx" in out.stdout
    return b


def manifest(b: Path) -> dict:
    return json.loads((b / "model.json").read_text())


def test_both_variants_are_listed_with_their_sha256(bundle):
    variants = manifest(bundle)["graphs"]["transformer"]["variants"]
    assert sorted(variants) == ["fp16", "int8"]
    for name, v in variants.items():
        assert v["file"] == f"transformer.{name}.onnx"
        assert v["sha256"] == hashlib.sha256((bundle / v["file"]).read_bytes()).hexdigest()
    assert not list(bundle.glob("*.tmp"))


def test_variants_keep_the_io_contract_and_opset(bundle):
    def ports(path):
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [(p.name, p.type, p.shape) for p in s.get_inputs() + s.get_outputs()]

    assert ports(bundle / "transformer.onnx") == [
        ("tokens", "tensor(int64)", ["batch", 64]), ("logits", "tensor(float)", ["batch", 64, 64])]
    for name in ("int8", "fp16"):
        path = bundle / f"transformer.{name}.onnx"
        assert ports(path) == ports(bundle / "transformer.onnx"), name
        opset = {o.domain or "ai.onnx": o.version for o in onnx.load(path).opset_import}
        assert opset["ai.onnx"] == 17, (name, opset)


def test_variants_agree_with_fp32(bundle):
    m = manifest(bundle)["provenance"]["metrics"]["variants"]
    assert m["int8"]["argmax_agreement"] >= 0.90, m["int8"]
    assert m["fp16"]["argmax_agreement"] >= 0.99, m["fp16"]
    assert m["fp16"]["max_abs_logit_diff"] < 1e-2 and m["int8"]["mean_kl"] < 1e-3
    # and independently of the recorded numbers: a fresh batch, batch size 3
    rng = np.random.default_rng(1)
    x = rng.integers(0, 64, (3, 64))
    x[rng.random((3, 64)) < 0.5] = 64
    fp32, int8 = (ort.InferenceSession(str(bundle / f), providers=["CPUExecutionProvider"])
                  .run(None, {"tokens": x})[0]
                  for f in ("transformer.onnx", "transformer.int8.onnx"))
    assert int8.shape == fp32.shape == (3, 64, 64) and int8.dtype == np.float32
    assert (int8.argmax(-1) == fp32.argmax(-1)).mean() >= 0.90


def test_only_one_variant_keeps_the_other_and_the_fp32_entries(bundle, fresh):
    b = fresh()
    run("variants", "--bundle", b, "--only", "int8")
    assert list(manifest(b)["graphs"]["transformer"]["variants"]) == ["int8"]
    run("variants", "--bundle", b, "--only", "fp16")
    m = manifest(b)
    assert sorted(m["graphs"]["transformer"]["variants"]) == ["fp16", "int8"]
    assert sorted(m["provenance"]["metrics"]["variants"]) == ["fp16", "int8"]
    fp32 = m["graphs"]["transformer"]
    assert fp32["sha256"] == manifest(bundle)["graphs"]["transformer"]["sha256"]
    assert "parity" in m["provenance"]["metrics"]


def test_bad_arguments_fail_clearly(tmp_path, fresh):
    out = run("variants", "--bundle", tmp_path / "nowhere", check=False)
    assert out.returncode == 1 and "no model.json" in out.stderr
    out = run("variants", "--bundle", tmp_path, "--only", "int4", check=False)
    assert out.returncode == 2 and "unknown variants ['int4']" in out.stderr
    b = fresh()
    with open(b / "transformer.onnx", "ab") as f:
        f.write(b"\0")
    out = run("variants", "--bundle", b, check=False)
    assert out.returncode == 1 and "sha256 differs" in out.stderr
    assert "variants" not in manifest(b)["graphs"]["transformer"]
