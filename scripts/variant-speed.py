#!/usr/bin/env python3
"""Per-call speed of a precision variant against fp32, measured with `absorb bench`.

Runs `absorb bench --json -` alternately on fp32 and the variant (so that drift of a shared
machine hits both alike), N pairs, batch 1, and prints the median and minimum per-call and
isolated-forward times and the speed-up. Standard library only.

    python3 scripts/variant-speed.py --bundle bench-models/churches --pairs 8 --threads 2
"""
import argparse
import json
import statistics
import subprocess
import sys


def bench(args, variant):
    cmd = [args.bin, "bench", "-m", args.bundle, "--steps", str(args.steps), "--count", "1",
           "--max-batch", "1", "--runs", "2", "--threads", str(args.threads), "--json", "-"]
    if variant != "fp32":
        cmd += ["--variant", variant]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"variant-speed: {' '.join(cmd)} failed:\n{p.stderr}")
    return json.loads(p.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default="target/release/absorb")
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--variant", default="int8")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    runs = {"fp32": [], args.variant: []}
    for i in range(args.pairs):
        for v in runs:
            runs[v].append(bench(args, v))
        print(f"pair {i + 1}/{args.pairs}: fp32 {runs['fp32'][-1]['per_call_ms']:.1f} ms, "
              f"{args.variant} {runs[args.variant][-1]['per_call_ms']:.1f} ms per call", flush=True)
    print(f"\n{args.bundle}, {args.pairs} interleaved pairs, batch 1, {args.threads} threads, "
          f"{args.steps} steps per run, ONNX Runtime {runs['fp32'][0]['onnxruntime']}")
    stats = {}
    for v, rs in runs.items():
        call = [r["per_call_ms"] for r in rs]
        fwd = [r["isolated_forward_ms"] for r in rs]
        stats[v] = (statistics.median(call), min(call), statistics.median(fwd), min(fwd))
        print(f"  {v:>5}: per call median {stats[v][0]:.1f} ms (min {stats[v][1]:.1f}), isolated forward "
              f"median {stats[v][2]:.1f} ms (min {stats[v][3]:.1f}), peak RSS {rs[0]['peak_rss_mib']:.0f} MiB")
    f, q = stats["fp32"], stats[args.variant]
    print(f"  {args.variant} faster by: per call {f[0] / q[0]:.2f}x (medians), {f[1] / q[1]:.2f}x (minima); "
          f"isolated forward {f[2] / q[2]:.2f}x (medians), {f[3] / q[3]:.2f}x (minima)")


if __name__ == "__main__":
    main()
