#!/usr/bin/env python3
"""Time per image with cached attention against exact mode, measured with `absorb bench`.

Runs `absorb bench --json -` alternately with `--cache off` and `--cache N` (so that drift of a
shared machine hits both alike), N pairs of one image each at the given sampler and step count,
and prints both times per image, the work per image in full transformer passes, and the ratio.
Standard library only.

    python3 scripts/cache-speed.py --bundle bench-models/churches --steps 256 --cache 8 --pairs 2
"""
import argparse
import json
import statistics
import subprocess
import sys


def bench(args, cache):
    cmd = [args.bin, "bench", "-m", args.bundle, "--steps", str(args.steps), "--sampler", args.sampler,
           "--cache", cache, "--count", "1", "--max-batch", "1", "--runs", str(args.runs), "--threads",
           str(args.threads), "--json", "-"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"cache-speed: {' '.join(cmd)} failed:\n{p.stderr}")
    return json.loads(p.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default="target/release/absorb")
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--cache", default="8", help="the cached mode's period N")
    ap.add_argument("--sampler", default="absorbing")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1, help="timed runs per bench (after its warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    modes = ("off", args.cache)
    runs = {m: [] for m in modes}
    for i in range(args.pairs):
        for m in modes:
            runs[m].append(bench(args, m))
        print(f"pair {i + 1}/{args.pairs}: " + ", ".join(
            f"cache {m} {runs[m][-1]['per_image_ms'] / 1000:.2f} s per image" for m in modes), flush=True)
    first = runs["off"][0]
    print(f"\n{args.bundle} ({first['tokens']} tokens), {args.sampler} sampler, S = {args.steps}, one image, "
          f"{args.threads} threads, {args.pairs} interleaved pairs, ONNX Runtime {first['onnxruntime']}")
    med = {}
    for m, rs in runs.items():
        t = [r["per_image_ms"] / 1000 for r in rs]
        med[m] = statistics.median(t)
        print(f"  cache {m:>3}: {med[m]:.2f} s per image (min {min(t):.2f}), {rs[0]['transformer_calls']:.0f} calls, "
              f"{rs[0]['full_passes_per_image']:.1f} full passes of work, peak RSS {rs[0]['peak_rss_mib']:.0f} MiB")
    print(f"  cached / exact time: {med[args.cache] / med['off']:.3f} (exact {med['off'] / med[args.cache]:.2f}x slower)")


if __name__ == "__main__":
    main()
