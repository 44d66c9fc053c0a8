"""Precision variants of a bundle's transformer: int8 weights for CPUs, fp16 for GPUs.

Reads DIR/model.json and DIR/transformer.onnx and writes, next to them,
- transformer.int8.onnx: onnxruntime's dynamic quantization (int8 weights, activations quantized
  per call, integer matmuls), for CPUs;
- transformer.fp16.onnx: fp16 weights and compute, for GPUs (CPUs run it, slowly).
Both keep the fp32 graph's contract: `tokens` int64 [batch, L] in, `logits` float32 [batch, L, K]
out, opset 17, one file. Each is measured against fp32 here, then listed in model.json
(graphs.transformer.variants: file + sha256; provenance.metrics.variants: the measurements),
which is rewritten atomically. The runtime picks one with `--variant`; this file never changes the
fp32 graphs (export.py does).

    python -m export variants --bundle models/digits
    python -m export variants --bundle /tmp/b --only int8
"""

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from export.classifier import sample_tokens
from export.export import (
    OPSET, TRANSFORMER_INPUT, TRANSFORMER_OUTPUT, ExportError, sha256_of,
)

# Measurement inputs: ROWS samples of the fp32 model itself (its default sampler at SAMPLE_STEPS
# steps), row i re-masked at rate (i + 0.5) / ROWS, so every masking level from ~0 to ~1 is seen.
ROWS = 16
SAMPLE_STEPS = 8
SEED = 0


def make_int8(src: Path, dst: Path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # MatMul only: these are the Linear layers, ~all of the compute (q@k and att@v have no constant
    # weight and stay float). Per-channel weight scales: lower KL than one scale per tensor on the
    # digits model. The embeddings (Gather) stay float; quantizing them saves memory, not time.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "consider pre-processing": we check the result ourselves
    try:
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         per_channel=True, use_external_data_format=False)
    finally:
        root.setLevel(level)


def make_fp16(src: Path, dst: Path):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # keep_io_types: a Cast after the graph's float32 boundary, so `logits` stays float32 (and the
    # int64 `tokens` are untouched either way).
    model = convert_float_to_float16(onnx.load(src), keep_io_types=True)
    onnx.save(model, dst)


VARIANTS = {  # name -> (file, maker, method recorded in provenance)
    "int8": ("transformer.int8.onnx", make_int8,
             "onnxruntime.quantization.quantize_dynamic: QInt8 per-channel weights, MatMul only"),
    "fp16": ("transformer.fp16.onnx", make_fp16,
             "onnxruntime.transformers.float16.convert_float_to_float16, keep_io_types"),
}


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ports(s: ort.InferenceSession):
    return ([(p.name, p.type, p.shape) for p in s.get_inputs()],
            [(p.name, p.type, p.shape) for p in s.get_outputs()])


def check_contract(path: Path, s: ort.InferenceSession, fp32: ort.InferenceSession):
    """Same input/output names, dtypes and shapes as fp32; opset 17; weights inside the file."""
    want, got = ports(fp32), ports(s)
    if got != want:
        raise ExportError(f"{path.name}: inputs/outputs {got} differ from transformer.onnx's "
                          f"{want}")
    model = onnx.load(path, load_external_data=False)
    opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    if opset.get("ai.onnx") != OPSET:
        raise ExportError(f"{path.name}: opset {opset}, expected ai.onnx {OPSET}")
    external = [t.name for t in model.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ExportError(f"{path.name}: {len(external)} initializers in external files, e.g. "
                          f"{external[0]!r}; the bundle wants one file per graph")


def log_softmax(z):  # (..., K) float64
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def probe_inputs(fp32: ort.InferenceSession, tokens: dict, temperature: float):
    """(ROWS, L) tokens from the fp32 model's own samples, partially re-masked; and the mask."""
    L, K = tokens["height"] * tokens["width"], tokens["codebook_size"]
    rng = np.random.default_rng(SEED)
    x = sample_tokens(fp32, ROWS, L, K, SAMPLE_STEPS, temperature, rng)  # (ROWS, L)
    rate = (np.arange(ROWS) + 0.5) / ROWS
    masked = rng.random((ROWS, L)) < rate[:, None]
    masked[:, 0] |= ~masked.any(1)  # every row draws at least one position
    return np.where(masked, tokens["mask_id"], x), masked


def compare(want, got, masked) -> dict:
    """Variant logits vs fp32's, at the masked positions the sampler draws from (temperature 1)."""
    lp, lq = log_softmax(want.astype(np.float64)), log_softmax(got.astype(np.float64))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)  # KL(fp32 || variant), (ROWS, L)
    return {
        "argmax_agreement": float((want.argmax(-1) == got.argmax(-1))[masked].mean()),
        "mean_kl": float(kl[masked].mean()),
        "max_abs_logit_diff": float(np.abs(got.astype(np.float64) - want).max()),
        "fp32_logit_std": float(want.std()),
    }


def write_variants(bundle: Path, names: list, threads: int = 1) -> dict:
    """Make, check and measure the named variants, then list them in model.json. -> metrics"""
    manifest_path = bundle / "model.json"
    if not manifest_path.is_file():
        raise ExportError(f"{bundle}: no model.json; is it a bundle directory (python -m export "
                          f"official/train-digits writes one)?")
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["graphs"]["transformer"]
    src = bundle / entry["file"]
    if not src.is_file() or sha256_of(src) != entry["sha256"]:
        raise ExportError(f"{src}: missing, or its sha256 differs from model.json's; re-export the "
                          f"bundle before making variants of it")
    fp32 = session(src, threads)
    x, masked = probe_inputs(fp32, manifest["tokens"], manifest["sampling"]["temperature"])
    want = fp32.run([TRANSFORMER_OUTPUT], {TRANSFORMER_INPUT: x})[0]
    made = {}
    for name in names:
        file, maker, method = VARIANTS[name]
        tmp = bundle / f"{file}.tmp"
        t0 = time.time()
        maker(src, tmp)
        s = session(tmp, threads)
        check_contract(tmp, s, fp32)
        got = s.run([TRANSFORMER_OUTPUT], {TRANSFORMER_INPUT: x})[0]
        made[name] = (tmp, file, {
            "method": method, "onnxruntime": ort.__version__,
            "inputs": f"{ROWS} fp32 samples ({SAMPLE_STEPS} steps, seed {SEED}) re-masked at rates "
                      f"(i + 0.5)/{ROWS}; agreement and KL over the masked positions",
            **compare(want, got, masked),
            "size_mb": round(tmp.stat().st_size / 1e6, 2), "seconds": round(time.time() - t0, 1),
        })
    # All made and checked: move them in place, then list them (temp file + rename).
    manifest = json.loads(manifest_path.read_text())
    variants = manifest["graphs"]["transformer"].setdefault("variants", {})
    measured = manifest["provenance"].setdefault("metrics", {}).setdefault("variants", {})
    for name, (tmp, file, metrics) in made.items():
        os.replace(tmp, bundle / file)
        variants[name] = {"file": file, "sha256": sha256_of(bundle / file)}
        measured[name] = metrics
    manifest["graphs"]["transformer"]["variants"] = dict(sorted(variants.items()))
    manifest["provenance"]["metrics"]["variants"] = dict(sorted(measured.items()))
    tmp = bundle / "model.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path)
    return {name: m for name, (_, _, m) in made.items()}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m export variants",
                                description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory (model.json)")
    p.add_argument("--only", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads for the checks")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        p.error(f"--only {args.only!r}: unknown variants {unknown}; known: {list(VARIANTS)}")
    if args.threads < 1:
        p.error(f"--threads {args.threads} must be >= 1")
    t0 = time.time()
    try:
        made = write_variants(args.bundle, list(dict.fromkeys(names)), args.threads)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {len(made)} variants into {args.bundle} in {time.time() - t0:.1f}s")
    for name, m in made.items():
        print(f"  {VARIANTS[name][0]}: {m['size_mb']} MB, argmax agreement "
              f"{m['argmax_agreement']:.4f}, mean KL {m['mean_kl']:.3g}, max abs logit diff "
              f"{m['max_abs_logit_diff']:.3g}")
