"""ONNX bundle export: official checkpoint loading, the three graphs, parity check, model.json.

A bundle is a directory with encoder.onnx, decoder.onnx, transformer.onnx and model.json (written
last). Its layout is the contract with the Rust runtime (src/bundle.rs, src/graphs/mod.rs); the names
and numbers below are that contract. This file does not train (train.py) or sample (the runtime).

    python -m export official --vqgan vqgan_ema_2200000.th --prior absorbing_ema_2000000.th \\
        --preset churches --out models/churches
    python -m export official --random-init --hparams export/tests/digits_shape.json --out /tmp/b
"""

import argparse
import dataclasses
import difflib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

from export.feed import CLASS_INPUT, TRANSFORMER_INPUT
from export.model import PRESETS, Autoencoder, PriorConfig, Transformer, VQConfig

# Graph I/O names, mirrored as consts in src/graphs/mod.rs.
ENCODER_INPUT = "image"
ENCODER_OUTPUT = "tokens"
DECODER_INPUT = "tokens"
DECODER_OUTPUT = "image"
TRANSFORMER_OUTPUT = "logits"
OPSET = 17  # JetPack's ORT 1.17 / TensorRT 8.6 read opset 17; the dynamo exporter emits opset 20
FORMAT = "absorb-bundle/1"
GRAPHS = {  # graph -> (file, input name, output name)
    "encoder": ("encoder.onnx", ENCODER_INPUT, ENCODER_OUTPUT),
    "decoder": ("decoder.onnx", DECODER_INPUT, DECODER_OUTPUT),
    "transformer": ("transformer.onnx", TRANSFORMER_INPUT, TRANSFORMER_OUTPUT),
}
# Dynamic axes: batch everywhere; the decoder is fully convolutional, so its grid is dynamic too.
DYNAMIC_AXES = {
    "encoder": {ENCODER_INPUT: {0: "batch"}, ENCODER_OUTPUT: {0: "batch"}},
    "decoder": {
        DECODER_INPUT: {0: "batch", 1: "h", 2: "w"},
        DECODER_OUTPUT: {0: "batch", 2: "H", 3: "W"},
    },
    "transformer": {TRANSFORMER_INPUT: {0: "batch"}, TRANSFORMER_OUTPUT: {0: "batch"},
                    CLASS_INPUT: {0: "batch"}},  # the last only in a conditional graph
}
PARITY_ATOL = 1e-4  # max abs difference allowed between onnxruntime and torch float outputs

# Keys of the official files that inference does not use (spec 2.6 and 9).
VQGAN_PREFIX, PRIOR_PREFIX = "ae.", "_denoise_fn."
VQGAN_IGNORED = ("disc.", "perceptual.", "ae.generator.logsigma.")
PRIOR_IGNORED = ("Lt_history", "Lt_count", "loss_history")
# hparams JSON keys: the official names; all required but norm_groups (default 32, official).
VQ_KEYS = ("img_size", "n_channels", "nf", "ch_mult", "res_blocks", "attn_resolutions",
           "codebook_size", "emb_dim")
PRIOR_KEYS = ("bert_n_emb", "bert_n_head", "bert_n_layers", "block_size")
HPARAM_KEYS = VQ_KEYS + ("latent_shape",) + PRIOR_KEYS
LIST_KEYS = ("ch_mult", "attn_resolutions", "latent_shape")


class ExportError(Exception):
    """A user-facing failure: bad hparams, a checkpoint that does not fit, a parity failure."""


# ---------------------------------------------------------------------------------------------
# Configuration


def config_from_hparams(hp: dict) -> tuple[VQConfig, PriorConfig]:
    """Official-name hparams dict -> configs; rejects missing and inconsistent keys.

    A full dump of the official hyperparameters is accepted: only the architecture keys are read,
    `sampler` must be "absorbing", and the training-only rest (learning rate, batch size, EMA,
    logging, ...) is listed in one log line. An ignored key one letter away from an architecture
    key is refused as a likely typo.
    """
    sampler = hp.get("sampler", "absorbing")
    if sampler != "absorbing":
        raise ExportError(f"hparams: sampler {sampler!r} is not supported: only the absorbing "
                          f"sampler's bidirectional transformer exports (sampler \"absorbing\")")
    quantizer = hp.get("quantizer", "nearest")
    if quantizer != "nearest":
        raise ExportError(f"hparams: quantizer {quantizer!r} is not supported: the encoder graph "
                          f"holds the nearest-code quantizer (quantizer \"nearest\")")
    known = set(HPARAM_KEYS) | {"norm_groups", "n_classes", "background_code", "attn_bias"}
    ignored = sorted(set(hp) - known - {"sampler", "quantizer"})
    for k in ignored:
        close = difflib.get_close_matches(k, sorted(known), n=1, cutoff=0.85)
        if close:
            raise ExportError(f"hparams: unknown key {k!r}; did you mean {close[0]!r}?")
    if ignored:
        print(f"hparams: ignoring {len(ignored)} keys inference does not use: "
              f"{', '.join(ignored)}", file=sys.stderr)
    missing = [k for k in HPARAM_KEYS if k not in hp]
    if missing:
        raise ExportError(f"hparams: missing keys {missing}")
    for k in HPARAM_KEYS + ("norm_groups",):
        v = hp.get(k, 32)
        vals = v if isinstance(v, list) else [v]
        if (k in LIST_KEYS) != isinstance(v, list) or not vals:
            kind = "a non-empty list" if k in LIST_KEYS else "an integer"
            raise ExportError(f"hparams: {k} must be {kind}, got {v!r}")
        if not all(type(x) is int and x > 0 for x in vals):
            raise ExportError(f"hparams: {k} must hold positive integers, got {v!r}")
    background = hp.get("background_code", False)
    if type(background) is not bool:
        raise ExportError(f"hparams: background_code must be true or false, got {background!r}")
    vq = VQConfig(**{k: tuple(hp[k]) if k in LIST_KEYS else hp[k] for k in VQ_KEYS},
                  norm_groups=hp.get("norm_groups", 32), background_code=background)
    n_classes = hp.get("n_classes", 0)
    if type(n_classes) is not int or n_classes < 0:
        raise ExportError(f"hparams: n_classes must be an integer >= 0, got {n_classes!r}")
    attn_bias = hp.get("attn_bias", False)
    if type(attn_bias) is not bool:
        raise ExportError(f"hparams: attn_bias must be true or false, got {attn_bias!r}")
    pc = PriorConfig(codebook_size=hp["codebook_size"], n_classes=n_classes, attn_bias=attn_bias,
                     **{k: hp[k] for k in PRIOR_KEYS})
    check_configs(vq, pc)
    h = vq.token_size
    if hp["latent_shape"] != [1, h, h]:
        raise ExportError(f"hparams: latent_shape {hp['latent_shape']} != [1, {h}, {h}] "
                          f"(img_size {vq.img_size} / 2^(len(ch_mult)-1))")
    return vq, pc


def check_configs(vq: VQConfig, pc: PriorConfig):
    down = 2 ** (len(vq.ch_mult) - 1)
    if vq.img_size % down:
        raise ExportError(f"hparams: img_size {vq.img_size} is not divisible by "
                          f"2^(len(ch_mult)-1) = {down}")
    bad = sorted({vq.nf * m for m in vq.ch_mult if (vq.nf * m) % vq.norm_groups})
    if bad:
        raise ExportError(f"hparams: norm_groups {vq.norm_groups} does not divide the channel "
                          f"counts {bad} (nf {vq.nf} x ch_mult {list(vq.ch_mult)})")
    if pc.block_size != vq.token_size**2:
        raise ExportError(f"hparams: block_size {pc.block_size} != h*w = {vq.token_size**2}")
    if pc.bert_n_emb % pc.bert_n_head:
        raise ExportError(f"hparams: bert_n_head {pc.bert_n_head} does not divide "
                          f"bert_n_emb {pc.bert_n_emb}")
    if pc.codebook_size != vq.codebook_size:
        raise ExportError(f"codebook_size differs: vqgan {vq.codebook_size}, "
                          f"prior {pc.codebook_size}")


def hparams_of(vq: VQConfig, pc: PriorConfig) -> dict:
    """Inverse of config_from_hparams: the official-name dict stored in provenance."""
    hp = {k: list(v) if k in LIST_KEYS else v for k, v in dataclasses.asdict(vq).items()}
    hp.pop("beta")
    if hp.pop("background_code"):  # absorb's code 0 for plain background (model.VQConfig); absent = off
        hp["background_code"] = True
    hp["latent_shape"] = [1, vq.token_size, vq.token_size]
    hp.update({k: getattr(pc, k) for k in PRIOR_KEYS})
    if pc.n_classes:  # a class-conditional prior (not the paper's); absent = 0
        hp["n_classes"] = pc.n_classes
    if pc.attn_bias:  # the grid-distance attention bias (model.PriorConfig); absent = off
        hp["attn_bias"] = True
    return hp


# ---------------------------------------------------------------------------------------------
# Official checkpoints


def load_state(module: nn.Module, path, prefix: str, ignored: tuple, hint: str):
    """Load `path` (a plain state dict) into `module`, strictly, after dropping `ignored` keys."""
    sd = torch.load(path, map_location="cpu", weights_only=True)  # the files hold CUDA tensors
    if not isinstance(sd, dict):
        raise ExportError(f"{path}: expected a state dict, found {type(sd).__name__}")
    own, unexpected = {}, []
    for k, v in sd.items():
        if k.startswith(ignored):
            continue
        if k.startswith(prefix):
            own[k[len(prefix):]] = v
        else:
            unexpected.append(k)
    expected = module.state_dict()
    unexpected += [prefix + k for k in own if k not in expected]
    problems = [f"missing key {prefix + k!r} (model expects shape {list(v.shape)})"
                for k, v in expected.items() if k not in own]
    problems += [f"key {prefix + k!r} has shape {list(own[k].shape)} in the file but the "
                 f"model expects {list(v.shape)}"
                 for k, v in expected.items() if k in own and own[k].shape != v.shape]
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {unexpected[:8]}")
    if problems:
        more = [f"... {len(problems) - 12} more"] if len(problems) > 12 else []
        shown = "\n  ".join(problems[:12] + more)
        raise ExportError(f"{path} does not fit the model:\n  {shown}\nlikely cause: {hint}")
    module.load_state_dict({k: v.float() for k, v in own.items()}, strict=True)


def load_official(vqgan_path, prior_path, vq: VQConfig, pc: PriorConfig):
    """`vqgan_ema_<step>.th` + `absorbing_ema_<step>.th` -> (Autoencoder, Transformer), eval."""
    hint = "wrong --preset/--hparams (nf, ch_mult, res_blocks, emb_dim, codebook_size, ...)"
    ae, prior = Autoencoder(vq), Transformer(pc)
    load_state(ae, vqgan_path, VQGAN_PREFIX, VQGAN_IGNORED,
               f"{hint}, or not a vqgan_ema_*.th file")
    load_state(prior, prior_path, PRIOR_PREFIX, PRIOR_IGNORED,
               f"{hint}, or not an absorbing_ema_*.th file")
    return ae.eval(), prior.eval()


def random_init(vq: VQConfig, pc: PriorConfig, seed: int):
    """Seeded random weights at any size, for benchmarks and runtime tests (not for images)."""
    torch.manual_seed(seed)
    ae, prior = Autoencoder(vq), Transformer(pc)
    # The official uniform(+-1/K) init makes codes nearly equidistant from every z (float ties);
    # a trained codebook is spread out, and so is this one.
    nn.init.normal_(ae.quantize.embedding.weight)
    return ae.eval(), prior.eval()


# ---------------------------------------------------------------------------------------------
# Graphs


class EncoderGraph(nn.Module):
    def __init__(self, ae: Autoencoder):
        super().__init__()
        self.ae = ae

    def forward(self, image):  # (B, C, H, W) -> (B, h, w) int64
        return self.ae.tokens(image)  # nearest codes (code 0 on plain background with background_code)


class DecoderGraph(nn.Module):
    def __init__(self, ae: Autoencoder):
        super().__init__()
        self.ae = ae

    def forward(self, tokens):  # (B, h, w) int64 -> (B, C, H, W), unclamped
        return self.ae.decode_tokens(tokens)


def graph_modules(ae: Autoencoder, prior: Transformer) -> dict:
    return {"encoder": EncoderGraph(ae), "decoder": DecoderGraph(ae), "transformer": prior}


def example_inputs(vq: VQConfig, pc: PriorConfig, batch: int, wide: bool = False) -> dict:
    """Fixed, seeded inputs per graph, each a tuple of the graph's inputs; `wide` doubles the width
    of the decoder's token grid. A conditional transformer also takes classes (-1 = none among them)."""
    g = torch.Generator().manual_seed(batch + 10 * wide)
    s, h = vq.img_size, vq.token_size
    tokens = torch.randint(0, pc.mask_id + 1, (batch, pc.block_size), generator=g)
    classes = (torch.arange(batch) % (pc.n_classes + 1) - 1,) if pc.n_classes else ()
    return {
        "encoder": (torch.rand(batch, vq.n_channels, s, s, generator=g),),
        "decoder": (torch.randint(0, vq.codebook_size, (batch, h, h * (1 + wide)), generator=g),),
        "transformer": (tokens, *classes),
    }


def input_names(graph: str, pc: PriorConfig) -> list[str]:
    """The graph's input names: the conditional transformer has a second one."""
    names = [GRAPHS[graph][1]]
    return names + [CLASS_INPUT] if graph == "transformer" and pc.n_classes else names


def output_dims(graph: str, vq: VQConfig, pc: PriorConfig) -> list:
    h = vq.token_size
    return {
        "encoder": ["batch", h, h],
        "decoder": ["batch", vq.n_channels, "H", "W"],
        "transformer": ["batch", pc.block_size, pc.codebook_size],
    }[graph]


def export_graphs(ae: Autoencoder, prior: Transformer, vq: VQConfig, pc: PriorConfig, out_dir):
    inputs = example_inputs(vq, pc, batch=2)
    for graph, module in graph_modules(ae, prior).items():
        file, _, output_name = GRAPHS[graph]
        names = input_names(graph, pc)
        axes = {k: v for k, v in DYNAMIC_AXES[graph].items() if k in names or k == output_name}
        path = str(out_dir / file)
        with torch.no_grad(), warnings.catch_warnings():
            # the legacy exporter is deliberate (see OPSET); its deprecation notice, its note on
            # a strided Slice it leaves unfolded and GroupNorm's batch-size check are noise here:
            # the graphs are checked below
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning,
                                    module="torch.nn.functional")
            torch.onnx.export(module, inputs[graph], path, input_names=names,
                              output_names=[output_name], dynamic_axes=axes,
                              opset_version=OPSET, do_constant_folding=True, dynamo=False)
        model = onnx.load(path, load_external_data=False)
        # The tracer names output dims after internal ops (and once even "batch" at dim 1): state
        # the contract's shapes and drop the stale intermediate shape annotations.
        del model.graph.value_info[:]
        shape = model.graph.output[0].type.tensor_type.shape
        del shape.dim[:]
        for d in output_dims(graph, vq, pc):
            if isinstance(d, str):
                shape.dim.add().dim_param = d
            else:
                shape.dim.add().dim_value = d
        onnx.save(model, path)
        onnx.checker.check_model(path, full_check=True)
        external = [t.name for t in model.graph.initializer
                    if t.data_location == onnx.TensorProto.EXTERNAL]
        if external:
            raise ExportError(f"graph {graph}: {len(external)} initializers in external data")


def check_parity(out_dir, ae: Autoencoder, prior: Transformer, vq: VQConfig, pc: PriorConfig,
                 atol: float = PARITY_ATOL) -> dict:
    """Run each exported graph in onnxruntime against torch; raise ExportError beyond tolerance.

    Cases: batch 1, batch 2, and the decoder on a twice-as-wide grid. Floats: max abs difference
    <= atol. Encoder tokens: identical, except where the two chosen codes are equally near in
    float64 (a float tie: counted in the report, not failed).
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    modules = graph_modules(ae, prior)
    wide = example_inputs(vq, pc, 1, wide=True)["decoder"]
    cases = [example_inputs(vq, pc, 1), example_inputs(vq, pc, 2), {"decoder": wide},
             *([{"transformer": example_inputs(vq, pc, pc.n_classes + 1)["transformer"]}] if pc.n_classes else [])]
    report = {}
    for graph, (file, _, _) in GRAPHS.items():
        sess = ort.InferenceSession(str(Path(out_dir) / file), opts,
                                    providers=["CPUExecutionProvider"])
        names = input_names(graph, pc)
        got_names = [i.name for i in sess.get_inputs()]
        if got_names != names:
            raise ExportError(f"parity: graph {graph!r} has inputs {got_names}, expected {names}")
        max_diff, mismatches, ties = 0.0, 0, 0
        for xs in [case[graph] for case in cases if graph in case]:
            x = xs[0]
            with torch.no_grad():
                want = modules[graph](*xs).numpy()
            got = sess.run(None, {n: v.numpy() for n, v in zip(names, xs)})[0]
            if got.shape != want.shape or got.dtype != want.dtype:
                raise ExportError(f"parity: graph {graph!r} gives {got.dtype}{list(got.shape)}, "
                                  f"torch {want.dtype}{list(want.shape)}, input {list(x.shape)}")
            if graph == "encoder":
                n_ties = count_ties(ae, x, want, got) if (got != want).any() else 0
                mismatches += int((got != want).sum()) - n_ties
                ties += n_ties
            else:
                max_diff = max(max_diff, float(np.abs(got.astype(np.float64) - want).max()))
        if graph == "encoder":
            report[graph] = {"token_mismatches": mismatches, "float_ties": ties}
            if mismatches:
                raise ExportError(f"parity: graph 'encoder' gives {mismatches} token ids that "
                                  f"differ from torch's")
        else:
            report[graph] = {"max_abs_diff": max_diff}
            if not max_diff <= atol:  # also catches NaN
                raise ExportError(f"parity: graph {graph!r} max abs diff {max_diff:.3g} > {atol}")
    return report


def count_ties(ae: Autoencoder, x, want, got) -> int:
    """How many differing tokens are float ties: both codes equally near z in float64."""
    with torch.no_grad():
        z = ae.encode(x).permute(0, 2, 3, 1).double()  # (B, h, w, D)
    e = ae.quantize.embedding.weight.detach().double()  # (K, D)
    ties = 0
    for b, i, j in zip(*np.nonzero(got != want)):
        zz = z[b, i, j]
        gap = ((zz - e[got[b, i, j]]) ** 2).sum() - ((zz - e[want[b, i, j]]) ** 2).sum()
        scale = 1.0 + (zz**2).sum() + (e**2).sum(1).max()  # float32 rounding ~ eps * scale
        ties += int(abs(gap) <= 1e-5 * scale)
    return ties


# ---------------------------------------------------------------------------------------------
# Bundle


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_short_hash() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def clear_stale(out_dir: Path) -> None:
    """Before a trainer writes a bundle over an older one: remove what belongs to the old weights and
    would be read with the new ones, since the trainer does not rewrite it (held-out images of
    another split, which the measurements read back from disk; precision variants of the old
    transformer and their probe rows). Everything else is rewritten."""
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir / "eval" / "heldout", ignore_errors=True)
    for f in [*out_dir.glob("transformer.*.onnx"), out_dir / "eval" / "variant-probe.json", out_dir / "cache.json"]:
        f.unlink(missing_ok=True)


def sampling_defaults(steps: int, temperature: float, temperature_end: float | None = None,
                      top_p: float | None = None, sampler: str | None = None, guidance: float | None = None) -> dict:
    """model.json's sampler keys of `sampling`, absent ones left out (top_p 1 = none, guidance 0 = none)."""
    return {"steps": int(steps), "temperature": float(temperature),
            **({"temperature_end": float(temperature_end)} if temperature_end else {}),
            **({"top_p": float(top_p)} if top_p and top_p < 1 else {}),
            **({"sampler": sampler} if sampler else {}),
            **({"guidance": float(guidance)} if guidance else {})}


def write_bundle(ae: Autoencoder, prior: Transformer, vq: VQConfig, pc: PriorConfig, out_dir, *,
                 name: str, image_range=(0.0, 1.0), steps: int, temperature: float, source: str,
                 metrics: dict | None = None, parity_atol: float = PARITY_ATOL,
                 window_stride: tuple[int, int] | None = None,
                 window_margin: tuple[int, int] | None = None, sampler: str | None = None,
                 temperature_end: float | None = None, outpaint_edge: int | None = None,
                 top_p: float | None = None, classes: list[str] | None = None, cache: bool = True,
                 guidance: float | None = None) -> Path:
    """Export the three graphs to `out_dir`, check them against torch, then write model.json; with
    `cache`, the cached-attention graph and cache.json too (cache.py). `guidance`: a
    class-conditional bundle's default classifier-free guidance scale (absent or 0: none)."""
    check_configs(vq, pc)
    assert steps >= 1, f"steps {steps} must be >= 1"
    assert temperature > 0, f"temperature {temperature} must be > 0"
    assert top_p is None or 0 < top_p <= 1, f"top_p {top_p} must be in (0, 1]"
    assert sampler in (None, "absorbing", "even", "maskgit", "halton"), f"sampler {sampler!r} is not one absorb has"
    assert not outpaint_edge or 0 < 2 * outpaint_edge < vq.token_size, f"outpaint_edge {outpaint_edge} out of range"
    if pc.n_classes and (classes is None or len(classes) != pc.n_classes):
        raise ExportError(f"a prior of {pc.n_classes} classes needs their {pc.n_classes} names (classes=)")
    if classes and not pc.n_classes:
        raise ExportError("class names given for a prior without classes")
    if guidance and not (pc.n_classes and 0 < guidance <= 100):
        raise ExportError(f"guidance {guidance}: a scale in (0, 100] for a class-conditional prior only")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "model.json").unlink(missing_ok=True)  # no stale manifest over half-written graphs
    ae, prior = ae.eval(), prior.eval()
    export_graphs(ae, prior, vq, pc, out_dir)
    parity = check_parity(out_dir, ae, prior, vq, pc, atol=parity_atol)
    h, size = vq.token_size, vq.img_size
    manifest = {
        "format": FORMAT,
        "name": name,
        "image": {"channels": vq.n_channels, "height": size, "width": size,
                  "range": [float(r) for r in image_range]},
        "tokens": {"height": h, "width": h, "codebook_size": vq.codebook_size,
                   "mask_id": pc.mask_id},
        "graphs": {g: {"file": f, "sha256": sha256_of(out_dir / f)}
                   for g, (f, _, _) in GRAPHS.items()},
        **({"classes": [str(c) for c in classes]} if classes else {}),
        "sampling": {**sampling_defaults(steps, temperature, temperature_end, top_p, sampler, guidance),
                     **({"window_stride": [int(v) for v in window_stride]} if window_stride else {}),
                     **({"window_margin": [int(v) for v in window_margin]} if window_margin else {}),
                     **({"outpaint_edge": int(outpaint_edge)} if outpaint_edge else {})},
        "provenance": {
            "exporter": f"absorb export {git_short_hash()}",
            "opset": OPSET,
            "source": source,
            "metrics": {**(metrics or {}), "parity": parity},
            "hparams": hparams_of(vq, pc),
        },
    }
    tmp = out_dir / "model.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / "model.json")
    if cache:  # cached attention between steps (cache.py): a graph and cache.json beside model.json
        from .cache import write_cache

        write_cache(prior, out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# CLI: python -m export official ...


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m export official",
                                description=__doc__.split("\n")[0])
    p.add_argument("--vqgan", type=Path, help="official vqgan_ema_<step>.th")
    p.add_argument("--prior", type=Path, help="official absorbing_ema_<step>.th")
    p.add_argument("--random-init", action="store_true", help="seeded random weights, no files")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-init")
    arch = p.add_mutually_exclusive_group(required=True)
    arch.add_argument("--preset", choices=sorted(PRESETS))
    arch.add_argument("--hparams", type=Path, help="JSON with the official hparams names")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--name", help="bundle name (default: the preset or the hparams file stem)")
    p.add_argument("--steps", type=int, default=256, help="default sampling steps (official 256)")
    p.add_argument("--temperature", type=float, default=1.0, help="default temperature (1.0)")
    p.add_argument("--parity-atol", type=float, default=PARITY_ATOL,
                   help="max abs difference onnxruntime vs torch (default %(default)s)")
    args = p.parse_args(argv)
    if args.random_init == bool(args.vqgan or args.prior):
        p.error("give either --vqgan FILE --prior FILE, or --random-init")
    if not args.random_init and not (args.vqgan and args.prior):
        p.error("--vqgan and --prior go together")
    torch.set_num_threads(1)  # the machine is shared; see export/README.md
    t0 = time.time()
    try:
        if args.preset:
            vq, pc = PRESETS[args.preset]
        else:
            vq, pc = config_from_hparams(json.loads(args.hparams.read_text()))
            if pc.n_classes:
                raise ExportError(f"hparams: n_classes {pc.n_classes}: the official checkpoints and random "
                                  f"weights are unconditional; a class-conditional bundle comes from "
                                  f"python -m export train-digits")
        if args.random_init:
            ae, prior = random_init(vq, pc, args.seed)
            source = f"random init, seed {args.seed}"
        else:
            ae, prior = load_official(args.vqgan, args.prior, vq, pc)
            source = f"official checkpoints {args.vqgan.name} + {args.prior.name}"
        out = write_bundle(ae, prior, vq, pc, args.out, name=args.name or args.preset or
                           args.hparams.stem, steps=args.steps, temperature=args.temperature,
                           source=source, parity_atol=args.parity_atol)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    parity = json.loads((out / "model.json").read_text())["provenance"]["metrics"]["parity"]
    print(f"wrote {out} in {time.time() - t0:.1f}s")
    for graph, (file, _, _) in GRAPHS.items():
        print(f"  {file}: {(out / file).stat().st_size / 1e6:.1f} MB, parity {parity[graph]}")
