"""Reference peers for `absorb bench`: the paper's sampler on the same bundle, in the same run.

Three runners generate `--count` images (one batch) at the same steps and temperature:
  (a) the official `AbsorbingDiffusion.sample` (spec 4.1) in PyTorch eager with the bundle's
      weights: the transformer runs at EVERY step t = S..1 on the whole batch, a categorical is
      drawn at every position, and kept only where t reveals it. Needs the weights in torch: a
      `--random-init` bundle is rebuilt from its provenance (hparams + seed) and one forward is
      checked against transformer.onnx; other bundles skip (a) and say why.
  (b) the same loop in plain Python (numpy) over onnxruntime and the bundle's transformer graph.
  (c) `absorb bench --json -` (a subprocess), whose default sampler skips empty steps and rows.
(a) and (b) live in child processes that load once and then run on request, so each one's peak
RSS (`resource.getrusage`) is its own; the runs are interleaved a, b, c in every repetition so
machine drift hits all three alike, and the ratios are taken per repetition. Times are per image
for the token sampling: absorb's decode (the same decoder graph for everyone) is reported apart
and subtracted. This file only measures; it never fails on a time.

    python -m export reference --bundle models/digits --count 16
    python -m export reference --bundle bench-models/churches --steps 8 --count 2 --variant int8
"""

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from export.feed import transformer_feed

# No torch (or export.export, which imports it) at module level: importing torch alone adds ~500 MB
# of RSS, which would be charged to the onnxruntime peer (b).
ROOT = Path(__file__).resolve().parents[1]
RANDOM_INIT = re.compile(r"random init, seed (\d+)")  # provenance.source of export.py --random-init


class ReferenceError(Exception):
    """A peer that could not run: a worker that died, absorb exiting with an error."""


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------
# (a) and (b): the official loop (spec 4.1), once in torch and once in numpy


def official_sample_torch(denoise, B: int, L: int, mask_id: int, steps: int, temp: float, gen):
    import torch

    x = torch.full((B, L), mask_id, dtype=torch.long)  # (B, L) all MASK
    unmasked = torch.zeros(B, L, dtype=torch.bool)
    forward_s = 0.0
    for t in range(steps, 0, -1):
        changes = torch.rand(B, L, generator=gen) < 1.0 / t  # candidates at this step
        changes &= ~unmasked  # already revealed positions stay
        unmasked |= changes
        t0 = time.perf_counter()
        logits = denoise(x)  # (B, L, K); the model ignores t
        forward_s += time.perf_counter() - t0
        # the official draws at all positions and writes where revealed
        x_0 = torch.distributions.Categorical(logits=logits / temp).sample()  # (B, L)
        x[changes] = x_0[changes]
    return x.numpy(), forward_s


def official_sample_numpy(denoise, B: int, L: int, mask_id: int, steps: int, temp: float, rng):
    x = np.full((B, L), mask_id, dtype=np.int64)
    unmasked = np.zeros((B, L), dtype=bool)
    forward_s = 0.0
    for t in range(steps, 0, -1):
        changes = (rng.random((B, L)) < 1.0 / t) & ~unmasked
        unmasked |= changes
        t0 = time.perf_counter()
        logits = denoise(x) / temp  # (B, L, K) float32
        forward_s += time.perf_counter() - t0
        p = np.exp(logits - logits.max(-1, keepdims=True))
        cdf = np.cumsum(p, -1)
        u = rng.random((B, L, 1), dtype=np.float32) * cdf[..., -1:]
        x_0 = np.minimum((cdf < u).sum(-1), logits.shape[-1] - 1)  # (B, L) inverse-CDF draws
        x[changes] = x_0[changes]
    return x, forward_s


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def masked_probe(B: int, L: int, K: int):
    """Seeded tokens with about half the positions masked. (B, L) int64"""
    rng = np.random.default_rng(0)
    x = rng.integers(0, K, (B, L))
    return np.where(rng.random((B, L)) < 0.5, K, x)


def worker(kind: str, bundle: Path, args):
    """A child process: load runner `kind`, then answer one JSON line per request on stdin."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed (by torch, onnxruntime) goes to stderr
    m = json.loads((bundle / "model.json").read_text())
    L, K = m["tokens"]["height"] * m["tokens"]["width"], m["tokens"]["codebook_size"]
    t0 = time.perf_counter()
    if kind == "torch":
        import torch

        from export.export import PARITY_ATOL, config_from_hparams, random_init

        torch.set_num_threads(args.threads)
        vq, pc = config_from_hparams(m["provenance"]["hparams"])
        seed = int(RANDOM_INIT.fullmatch(m["provenance"]["source"]).group(1))
        # the whole official model, as its sampler holds it; the autoencoder must be built anyway
        # to replay the seeded init in order
        ae, prior = random_init(vq, pc, seed)

        def denoise(x):
            with torch.inference_mode():
                return prior(x)

        def sample(seed):
            gen = torch.Generator().manual_seed(seed)
            return official_sample_torch(denoise, args.count, L, K, args.steps, args.temperature,
                                         gen)

        def warm():
            with torch.inference_mode():
                prior(torch.full((args.count, L), K, dtype=torch.long))
    else:
        file = m["graphs"]["transformer"]["file"]
        if args.variant:
            file = m["graphs"]["transformer"]["variants"][args.variant]["file"]
        s = ort_session(bundle / file, args.threads)

        def denoise(x):  # a conditional graph gets "no class" for every row
            return s.run(None, transformer_feed(s, x))[0]

        def sample(seed):
            rng = np.random.default_rng(seed)
            return official_sample_numpy(denoise, args.count, L, K, args.steps, args.temperature,
                                         rng)

        def warm():
            denoise(np.full((args.count, L), K, dtype=np.int64))

    warm()  # one forward at the timed batch: allocation and planning, untimed
    ready = {"load_s": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}
    out.write(json.dumps(ready) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "run":
            t0 = time.perf_counter()
            x, forward_s = sample(req["seed"])
            total = time.perf_counter() - t0
            assert ((x >= 0) & (x < K)).all(), "a MASK or out-of-range token survived the last step"
            out.write(json.dumps({"per_image_ms": 1e3 * total / args.count, "calls": args.steps,
                                  "per_call_ms": 1e3 * forward_s / args.steps,
                                  "outside_forward": 1 - forward_s / total,
                                  "peak_rss_mib": peak_rss_mib()}) + "\n")
        elif req["op"] == "verify":  # after the timed runs, so the session is not in the RSS
            x = masked_probe(2, L, K)
            with torch.inference_mode():
                want = prior(torch.from_numpy(x)).numpy()
            s = ort_session(bundle / m["graphs"]["transformer"]["file"], args.threads)
            got = s.run(None, transformer_feed(s, x))[0]
            out.write(json.dumps({"max_abs_diff": float(np.abs(got - want).max()),
                                  "atol": PARITY_ATOL}) + "\n")


class Peer:
    """A worker child process, driven one JSON line at a time."""

    def __init__(self, kind: str, argv: list):
        self.proc = subprocess.Popen([sys.executable, "-m", "export.reference", "--worker", kind,
                                      *argv], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.ready = self.read()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise ReferenceError(f"reference worker exited with status {self.proc.wait()} "
                              f"(its stderr is above)")
        return json.loads(line)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def absorb_bench(args, seed: int) -> dict:
    cmd = [str(args.absorb), "bench", "--model", str(args.bundle), "--steps", str(args.steps),
           "--temperature", str(args.temperature), "--count", str(args.count), "--max-batch",
           str(args.count), "--runs", "1", "--seed", str(seed), "--threads", str(args.threads),
           "--json", "-"]
    if args.variant:
        cmd += ["--variant", args.variant]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise ReferenceError(f"{' '.join(cmd)} exited with {out.returncode}:\n{out.stderr}")
    r = json.loads(out.stdout)
    r["sampling_per_image_ms"] = r["per_image_ms"] - r["decode_per_image_ms"]
    return r


# ---------------------------------------------------------------------------------------------
# CLI: python -m export reference ...


def spread(xs) -> str:
    return (f"{statistics.mean(xs):.4g}" if len(xs) == 1 else
            f"{statistics.mean(xs):.4g} [{min(xs):.4g}..{max(xs):.4g}]")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m export reference",
                                description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory (model.json)")
    p.add_argument("--steps", type=int, help="reverse steps S (default: the bundle's)")
    p.add_argument("--temperature", type=float, help="temperature (default: the bundle's)")
    p.add_argument("--count", type=int, default=16, help="images, one batch (default 16)")
    p.add_argument("--threads", type=int, default=1, help="threads of every runner (default 1)")
    p.add_argument("--reps", type=int, default=3, help="paired repetitions (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first repetition")
    p.add_argument("--variant", help="transformer variant for (b) and (c), e.g. int8; (a) is fp32")
    p.add_argument("--absorb", type=Path, default=ROOT / "target/release/absorb",
                   help="absorb binary (default: target/release/absorb; make build)")
    p.add_argument("--json", type=Path, help="also write all measurements to this file")
    p.add_argument("--worker", choices=["torch", "ort"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    manifest_path = args.bundle / "model.json"
    if not manifest_path.is_file():
        p.error(f"--bundle {args.bundle}: no model.json (a bundle directory holds one)")
    m = json.loads(manifest_path.read_text())
    L = m["tokens"]["height"] * m["tokens"]["width"]
    args.steps = args.steps or m["sampling"]["steps"]
    args.temperature = args.temperature or m["sampling"]["temperature"]
    if not 1 <= args.steps <= L:
        p.error(f"--steps {args.steps} must be in 1..={L} (tokens per image)")
    for flag in ("count", "threads", "reps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)} must be >= 1")
    if args.temperature <= 0:
        p.error(f"--temperature {args.temperature} must be > 0")
    variants = m["graphs"]["transformer"].get("variants", {})
    if args.variant and args.variant not in variants:
        p.error(f"--variant {args.variant}: the bundle has {sorted(variants)}; make one with "
                f"python -m export variants --bundle {args.bundle}")
    if args.worker:
        return worker(args.worker, args.bundle, args)
    if not args.absorb.is_file():
        p.error(f"--absorb {args.absorb}: no such binary; run make build")

    source = m["provenance"].get("source", "")
    torch_ok = bool(RANDOM_INIT.fullmatch(source)) and "hparams" in m["provenance"]
    peer_argv = ["--bundle", str(args.bundle), "--steps", str(args.steps), "--temperature",
                 str(args.temperature), "--count", str(args.count), "--threads", str(args.threads)]
    peer_argv += ["--variant", args.variant] if args.variant else []
    variant = args.variant or "fp32"
    print(f"reference: {m['name']} ({L} tokens, K {m['tokens']['codebook_size']}), steps "
          f"{args.steps}, temperature {args.temperature}, {args.count} images per batch, "
          f"{args.threads} thread(s), {args.reps} paired repetitions; (b) and (c) run {variant}")
    if not torch_ok:
        print(f"(a) skipped: its provenance source is {source!r}, not a seeded random init, and "
              f"the bundle keeps no torch checkpoint, so torch cannot hold the same weights")
    try:
        peers = {}
        t0 = time.time()
        if torch_ok:
            peers["a"] = Peer("torch", peer_argv)
        peers["b"] = Peer("ort", peer_argv)
        print(f"loaded in {time.time() - t0:.1f}s: " + ", ".join(
            f"({k}) {v.ready['load_s']:.1f}s" for k, v in peers.items()))
        runs = {k: [] for k in ("a", "b", "c") if k in peers or k == "c"}
        for r in range(args.reps):
            for k in runs:  # a, b, c in turn: drift cancels in the per-repetition ratios
                runs[k].append(absorb_bench(args, args.seed + r) if k == "c"
                               else peers[k].ask(op="run", seed=args.seed + r))
            print(f"  rep {r + 1}/{args.reps}: " + ", ".join(
                f"({k}) {v[-1].get('sampling_per_image_ms', v[-1]['per_image_ms']):.1f} ms/image"
                for k, v in runs.items()), flush=True)
        verify = peers["a"].ask(op="verify") if torch_ok else None
        for peer in peers.values():
            peer.close()
    except ReferenceError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

    c = runs["c"]
    ours = [x["sampling_per_image_ms"] for x in c]
    names = {"a": "(a) official loop, torch eager",
             "b": f"(b) official loop, onnxruntime {variant}", "c": f"(c) absorb bench {variant}"}
    print(f"\n{'runner':<38} {'ms/image':>24} {'calls':>7} {'ms/call':>9} {'outside fwd':>11} "
          f"{'peak RSS MiB':>12} {'absorb/this':>24}")
    for k in ("a", "b"):
        if k in runs:
            xs = runs[k]
            ratio = [o / x["per_image_ms"] for o, x in zip(ours, xs)]
            print(f"{names[k]:<38} {spread([x['per_image_ms'] for x in xs]):>24} "
                  f"{args.steps:>7} {statistics.mean(x['per_call_ms'] for x in xs):>9.2f} "
                  f"{statistics.mean(x['outside_forward'] for x in xs):>11.1%} "
                  f"{max(x['peak_rss_mib'] for x in xs):>12.0f} {spread(ratio):>24}")
    calls = statistics.mean(x["transformer_calls"] for x in c)
    print(f"{names['c']:<38} {spread(ours):>24} {calls:>7.1f} "
          f"{statistics.mean(x['per_call_ms'] for x in c):>9.2f} "
          f"{statistics.mean(x['runner_overhead'] for x in c):>11.1%} "
          f"{max(x['peak_rss_mib'] for x in c):>12.0f}")
    decode = statistics.mean(x["decode_per_image_ms"] for x in c)
    print(f"absorb also decodes: {decode:.1f} ms/image "
          f"(total {spread([x['per_image_ms'] for x in c])} ms/image); ms/image above is sampling "
          f"only. ONNX Runtime: absorb {c[0]['onnxruntime']}, (b) the Python package.")
    if verify:
        ok = verify["max_abs_diff"] <= verify["atol"]
        print(f"(a) weights: one torch forward vs transformer.onnx, max abs diff "
              f"{verify['max_abs_diff']:.3g} ({'within' if ok else 'OVER'} {verify['atol']})")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "runs": runs, "verify": verify}, indent=2) + "\n")
    if verify and not verify["max_abs_diff"] <= verify["atol"]:
        print("error: (a) does not hold the bundle's weights; its times compare other weights",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
