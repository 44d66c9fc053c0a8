#!/usr/bin/env python3
"""The quality-versus-cost frontier as a Markdown table, from `absorb eval --json` files.

Each row: sampler (with its threshold), steps, cache schedule, transformer calls per batch, the
work per image in full passes, wall time per image, the bundle's quality measure (classifier
confidence relative to real images, or KID x 1000 for a bundle whose judge gives features), class
agreement, and token agreement with exact mode at the same seed. Rows on the frontier (no other row is both faster
per image and at least as good) are marked. Standard library
only.

    python3 scripts/frontier-table.py out/frontier-digits*.json
"""
import json
import sys


def quality(r):
    """Higher is better: confidence vs real, or minus KID."""
    if r.get("kid_x1000") is not None:
        return -r["kid_x1000"]
    return r.get("ratio_to_real") or 0.0


def main():
    rows = []
    for path in sys.argv[1:]:
        with open(path) as f:
            rows += json.load(f)["rows"]
    if not rows:
        sys.exit("frontier-table: give absorb eval --json files")
    kid = any(r.get("kid_x1000") is not None for r in rows)
    on = []
    for r in rows:
        beaten = any(o is not r and o["ms_per_image"] < r["ms_per_image"] and quality(o) >= quality(r)
                     for o in rows)
        on.append(not beaten)
    head = "| sampler | steps | cache | calls per batch | full passes per image | ms per image | "
    head += "KID x 1000 | " if kid else "confidence vs real | "
    head += "class agreement | tokens as exact | frontier |"
    print(head)
    print("|" + "---|" * head.count(" | ") + "---|")
    key = lambda r: (r["sampler"], r.get("threshold") or 0, r["steps"], 0 if r["cache"] == "off" else int(r["cache"]))
    for r, f in sorted(zip(rows, on), key=lambda x: key(x[0])):
        name = r["sampler"] + (f" {r['threshold']:.2g}" if r.get("threshold") else "")
        q = f"{r['kid_x1000']:.1f}" if kid else f"{r['ratio_to_real']:.3f}"
        agree = "" if r.get("class_agreement") is None else f"{r['class_agreement']:.3f}"
        tok = "exact" if r["cache"] == "off" else f"{r['token_agreement_with_exact']:.2f}"
        print(f"| {name} | {r['steps']} | {r['cache']} | {r['calls_per_batch']:.1f} | "
              f"{r['full_passes_per_image']:.2f} | {r['ms_per_image']:.1f} | {q} | {agree} | {tok} | "
              f"{'yes' if f else ''} |")


if __name__ == "__main__":
    main()
