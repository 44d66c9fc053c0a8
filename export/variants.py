"""Precision variants of a bundle's transformer: int8 weights for CPUs, fp16 for GPUs.

Reads DIR/model.json and DIR/transformer.onnx and writes, next to them,
- transformer.int8.onnx: onnxruntime's dynamic quantization (8-bit weights, activations quantized
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
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from export.classifier import sample_tokens
from export.export import OPSET, TRANSFORMER_OUTPUT, ExportError, sha256_of
from export.feed import is_conditional, transformer_feed

# Measurement inputs (the probe): ROWS samples of the fp32 model itself (its default sampler at
# SAMPLE_STEPS steps), row i re-masked at rate (i + 0.5) / ROWS, so every masking level from ~0 to
# ~1 is seen. They are written to eval/variant-probe.json, so `absorb check-variant` measures the
# same rows on any CPU (aarch64 included).
ROWS = 128
SAMPLE_STEPS = 8
SEED = 0
PROBE_FILE = "eval/variant-probe.json"
# The least argmax agreement with fp32 a variant may have on the probe: below it, no variant is
# written (and the runtime warns on CPUs where a bundle records less).
BAR = {"int8": 0.95, "fp16": 0.99}


def make_int8(src: Path, dst: Path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # MatMul only: these are the Linear layers, ~all of the compute (q@k and att@v have no constant
    # weight and stay float). The embeddings (Gather) stay float; quantizing them saves memory,
    # not time. So does the output head (the MatMul writing `logits`): under 1% of the compute
    # at paper size, and the layer whose error moves an argmax most directly.
    # Weights QInt8 per channel with reduce_range (7 bits, |w| <= 64): ONNX Runtime's u8 x s8
    # kernel on x86-64 without VNNI (AVX2, AVX-512 BW) adds pairs of u8*s8 products in 16 bits
    # with saturation; 2 * 255 * 64 = 32640 fits, so no sum ever saturates and every kernel
    # (AVX2, AVX-512, VNNI, AMX, NEON dot product) computes the same integers. Measured on an
    # AVX2 CPU, argmax agreement with fp32 on 128 probe rows (random-init digits shape / trained
    # digits / 16 rows of the random paper-size model) and the speed-up per call at paper size:
    #   QInt8 per channel (the old format)      0.902 / 0.983 / 0.846, 1.56x (VNNI: 0.992 digits)
    #   QInt8 per channel, reduce_range         0.954 / 0.990 / 0.904, 1.53x
    #   the same, head in float (this)          0.959 / 0.994 / 0.887, 1.4-1.5x
    #   QUInt8 per channel (u8 x u8), head float 0.977 / 0.994 / 0.925, 1.26-1.32x: too slow
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "consider pre-processing": we check the result ourselves
    try:
        head = [n.name for n in onnx.load(src, load_external_data=False).graph.node
                if n.op_type == "MatMul" and TRANSFORMER_OUTPUT in n.output]
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         per_channel=True, reduce_range=True, nodes_to_exclude=head,
                         use_external_data_format=False)
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
             "onnxruntime.quantization.quantize_dynamic: QInt8 per-channel weights with "
             "reduce_range (7 bits: no u8 x s8 pair sum saturates, so every CPU kernel computes "
             "the same integers), MatMul only, the output head in float"),
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


def int8_kernel() -> str:
    """The int8 matmul kernel family ONNX Runtime uses on this CPU, named as src/cpu.rs names it."""
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags |= set(line.split(":", 1)[1].split())
    if platform.machine() in ("aarch64", "arm64"):
        return "i8mm" if "i8mm" in flags else "dotprod" if "asimddp" in flags else "neon"
    for kernel, need in (("amx", {"amx_int8", "amx_tile"}), ("avx512_vnni", {"avx512_vnni"}),
                         ("avx_vnni", {"avx_vnni"}), ("avx512_core", {"avx512bw"}),
                         ("avx2", {"avx2"})):
        if need <= flags:
            return kernel
    return "sse"


def probe_classes(fp32: ort.InferenceSession, n_classes: int, rows: int):
    """The class of each probe row of a conditional graph: row i has class i mod n (every class
    alike, as generation draws them); None for an unconditional graph."""
    if not is_conditional(fp32):
        return None
    if n_classes < 1:
        raise ExportError("the transformer takes a class but model.json lists no classes")
    return np.arange(rows) % n_classes


def probe_inputs(fp32: ort.InferenceSession, tokens: dict, temperature: float, rows: int = ROWS,
                 seed: int = SEED, classes=None):
    """(rows, L) tokens from the fp32 model's own samples (of `classes`, one per row, when the
    graph is conditional), partially re-masked; and the mask."""
    L, K = tokens["height"] * tokens["width"], tokens["codebook_size"]
    rng = np.random.default_rng(seed)
    x = sample_tokens(fp32, rows, L, K, SAMPLE_STEPS, temperature, rng, classes)  # (rows, L)
    rate = (np.arange(rows) + 0.5) / rows
    masked = rng.random((rows, L)) < rate[:, None]
    masked[:, 0] |= ~masked.any(1)  # every row draws at least one position
    return np.where(masked, tokens["mask_id"], x), masked


def logits_of(s: ort.InferenceSession, x, chunk: int = 32, classes=None):
    """(R, L) tokens (and (R,) classes) -> (R, L, K) logits, `chunk` rows per call (paper-size rows
    are big)."""
    def part(i):
        c = None if classes is None else classes[i:i + chunk]
        return s.run([TRANSFORMER_OUTPUT], transformer_feed(s, x[i:i + chunk], c))[0]
    return np.concatenate([part(i) for i in range(0, len(x), chunk)])


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


def write_variants(bundle: Path, names: list, threads: int = 1, rows: int = ROWS,
                   bar: float | None = None) -> dict:
    """Make, check and measure the named variants, then list them in model.json. -> metrics

    A variant whose argmax agreement with fp32 on the probe is below its bar (BAR, or `bar`) on
    this CPU is not written (ExportError). Agreement is recorded per int8 kernel family (`agreement_by_cpu`);
    measurements of an identical file on other CPUs are kept.
    """
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
    classes = probe_classes(fp32, len(manifest.get("classes", [])), rows)
    x, masked = probe_inputs(fp32, manifest["tokens"], manifest["sampling"]["temperature"], rows,
                             classes=classes)
    want = logits_of(fp32, x, classes=classes)
    kernel = int8_kernel()
    old = manifest["provenance"].get("metrics", {}).get("variants", {})
    made = {}
    for name in names:
        file, maker, method = VARIANTS[name]
        tmp = bundle / f"{file}.tmp"
        t0 = time.time()
        maker(src, tmp)
        s = session(tmp, threads)
        check_contract(tmp, s, fp32)
        got = logits_of(s, x, classes=classes)
        metrics = compare(want, got, masked)
        need = BAR[name] if bar is None else bar
        if metrics["argmax_agreement"] < need:
            for t in [tmp] + [m[0] for m in made.values()]:
                t.unlink()
            raise ExportError(f"{file}: argmax agreement with fp32 {metrics['argmax_agreement']:.4f} "
                              f"on this CPU ({kernel}) is below the bar {need}; not written")
        sha = sha256_of(tmp)
        by_cpu = {}
        if old.get(name, {}).get("sha256") == sha:  # the same file measured on other CPUs
            by_cpu = dict(old[name].get("agreement_by_cpu", {}))
        by_cpu[kernel] = round(metrics["argmax_agreement"], 4)
        made[name] = (tmp, file, {
            "method": method, "onnxruntime": ort.__version__, "sha256": sha,
            "inputs": f"{rows} fp32 samples ({SAMPLE_STEPS} steps, seed {SEED}) re-masked at rates "
                      f"(i + 0.5)/{rows} ({PROBE_FILE}); agreement and KL over the masked positions",
            "measured_on": kernel, **metrics, "bar": need,
            "agreement_by_cpu": dict(sorted(by_cpu.items())),
            "size_mb": round(tmp.stat().st_size / 1e6, 2), "seconds": round(time.time() - t0, 1),
        })
    # All made and checked: move them in place, then list them (temp file + rename).
    probe = bundle / PROBE_FILE
    probe.parent.mkdir(exist_ok=True)
    tmp = probe.with_name(probe.name + ".tmp")
    tmp.write_text(json.dumps({"seed": SEED, "sample_steps": SAMPLE_STEPS, "rows": x.tolist(),
                               **({} if classes is None else {"classes": classes.tolist()})},
                              separators=(",", ":")) + "\n")
    os.replace(tmp, probe)
    manifest = json.loads(manifest_path.read_text())
    variants = manifest["graphs"]["transformer"].setdefault("variants", {})
    measured = manifest["provenance"].setdefault("metrics", {}).setdefault("variants", {})
    for name, (tmp, file, metrics) in made.items():
        os.replace(tmp, bundle / file)
        variants[name] = {"file": file, "sha256": metrics["sha256"]}
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
    p.add_argument("--rows", type=int, default=ROWS,
                   help="probe rows: sampled grids the variants are compared on (default %(default)s)")
    p.add_argument("--bar", type=float,
                   help="least argmax agreement to accept (default: int8 0.95, fp16 0.99); a "
                        "random-init benchmark bundle's flat logits need a lower one")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        p.error(f"--only {args.only!r}: unknown variants {unknown}; known: {list(VARIANTS)}")
    if args.threads < 1:
        p.error(f"--threads {args.threads} must be >= 1")
    if args.rows < 1:
        p.error(f"--rows {args.rows} must be >= 1")
    t0 = time.time()
    try:
        made = write_variants(args.bundle, list(dict.fromkeys(names)), args.threads, args.rows, args.bar)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {len(made)} variants into {args.bundle} in {time.time() - t0:.1f}s")
    for name, m in made.items():
        print(f"  {VARIANTS[name][0]}: {m['size_mb']} MB, argmax agreement "
              f"{m['argmax_agreement']:.4f} on {m['measured_on']}, mean KL {m['mean_kl']:.3g}, max abs logit diff "
              f"{m['max_abs_logit_diff']:.3g}")
