"""Judge and measure a bundle trained by images.py: a small network trained for it, KID on its
features, and the absorb binary generating from the shipped graphs (every sampler, several step
counts, wide images with overlapping windows, outpainting of held-out crops).

The judge is a CNN with one class per source image (crop mode; one class in whole mode) and one
"fake" class (decoded random token grids, real token grids with their positions shuffled, noise).
Its 64 globally pooled features are the space where KID compares samples with held-out crops:
the unbiased squared MMD with the cubic polynomial kernel of Binkowski et al. (2018), x 1000,
on features divided by one fixed number (their root mean square over the held-out crops). The
references put a number in context: train crops (what a perfect model would score, up to the
held-out part being other pixels), reconstructions (the autoencoder's ceiling), and the fakes.
"""

import json
import math
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from . import classifier as C
from . import train as T

JUDGE_INPUT, JUDGE_LOGITS, JUDGE_FEATURES = "image", "logits", "features"
SAMPLERS = ("absorbing", "even", "maskgit")
STEPS = (4, 8, 16, 32, 64)
TEMPERATURES = (0.8, 0.9, 1.0, 1.1)
MASKGIT_STEPS = 16  # MaskGIT's candidate step count for the defaults (a quarter of an 8x8 grid)
SEAM_BAR = 1.3  # boundary / inside difference ratio a wide image must stay below
# (stride, margin) candidates for wide images, in tokens, as fractions of the window side
TILE_CANDIDATES = ((2, 8), (2, 4), (4, 8), (4, 4))  # stride = w / a, margin = w / b


class Judge(nn.Module):
    def __init__(self, channels: int, n_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, n_classes)

    def forward(self, x):  # (B, C, S, S) -> ((B, classes) logits, (B, 64) features)
        f = self.features(x)
        return self.head(f), f


def default_tiles(mode: str, grid: int) -> dict:
    """Windows for grids larger than the trained one, until measure() has chosen: crops of stationary
    images overlap (half a window, an eighth margin); whole images of one subject must not."""
    if mode == "whole":
        return dict(window_stride=(grid, grid), window_margin=(0, 0))
    return dict(window_stride=(grid // 2, grid // 2), window_margin=(max(1, grid // 8),) * 2)


@torch.no_grad()
def shuffled_tokens(ae, x, gen):
    """Real crops' token grids with their positions permuted: the right codes, no structure."""
    t = T.encode_all(ae, x)  # (N, h, w)
    N, h, w = t.shape
    flat = t.view(N, -1)
    perm = torch.argsort(torch.rand(N, h * w, generator=gen), dim=1)
    t = torch.gather(flat, 1, perm).view(N, h, w)
    return torch.cat([ae.decode_tokens(t[i:i + 256]).clamp(0, 1) for i in range(0, N, 256)])


def fakes(cfg, ae, x_real, n: int, gen):
    grid = cfg.vq.token_size
    with torch.no_grad():
        tokens = T.encode_all(ae, x_real)
    counts = torch.bincount(tokens.flatten(), minlength=cfg.codebook_size).float()
    rand = [C.decode_random_tokens(ae, n, grid, gen), C.decode_random_tokens(ae, n, grid, gen, counts / counts.sum())]
    noise = torch.rand(n // 2, cfg.n_channels, cfg.img_size, cfg.img_size, generator=gen)
    return torch.cat(rand + [shuffled_tokens(ae, x_real[:n], gen), noise])


def train_judge(cfg, data, ae, gen: torch.Generator, iters: int = 1000) -> Judge:
    """Real train crops and their reconstructions (so decoder texture is no cue), labelled by source,
    against fakes."""
    from .images import fixed_set

    n = max(64, iters)
    x, y = fixed_set(data, "train", 2 * n, cfg.img_size, cfg.seed + 2)
    with torch.no_grad():
        t = T.encode_all(ae, x)
        rec = torch.cat([ae.decode_tokens(t[i:i + 256]).clamp(0, 1) for i in range(0, len(t), 256)])
    pos_x, pos_y = torch.cat([x, rec]), torch.cat([y, y])
    neg = fakes(cfg, ae, x, n, gen)
    fake_class = len(data.names)
    return C.fit(Judge(cfg.n_channels, fake_class + 1), lambda m, x: m(x)[0], pos_x, pos_y, neg, fake_class,
                 iters, gen, "judge")


def export_judge(judge: Judge, path: Path, channels: int, size: int):
    """Opset 17, legacy exporter, checked in onnxruntime against torch."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [JUDGE_LOGITS, JUDGE_FEATURES]
    torch.onnx.export(judge, (torch.rand(4, channels, size, size),), str(path), input_names=[JUDGE_INPUT],
                      output_names=names, dynamic_axes={k: {0: "batch"} for k in [JUDGE_INPUT] + names},
                      opset_version=17, dynamo=False)
    x = torch.rand(5, channels, size, size)
    with torch.no_grad():
        want = judge(x)[0].numpy()
    got = C.session(path).run([JUDGE_LOGITS], {JUDGE_INPUT: x.numpy()})[0]
    err = float(np.abs(got - want).max())
    assert err < 1e-4, f"judge.onnx differs from torch by {err:.2e}"


def to_png(x: np.ndarray, path: Path):
    """(C, H, W) float in [0, 1] -> 8-bit PNG (grey or RGB)."""
    a = (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)
    Image.fromarray(a[0] if len(a) == 1 else a.transpose(1, 2, 0)).save(path)


def read_png(path: Path, channels: int) -> np.ndarray:
    """PNG -> (C, H, W) float in [0, 1]."""
    a = np.asarray(Image.open(path).convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def save_heldout(x, y, names, folder: Path):
    """eval/heldout/NNN_SOURCE.png: the fixed held-out crops, never trained on."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(x.numpy(), y.tolist())):
        to_png(img, folder / f"{i:03d}_{Path(names[label]).stem}.png")


def kid_x1000(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, x 1000. (N, d), (M, d) features."""
    d = a.shape[1]
    kaa, kbb, kab = [(u @ v.T / d + 1) ** 3 for u, v in ((a, a), (b, b), (a, b))]
    n, m = len(a), len(b)
    mmd = ((kaa.sum() - np.trace(kaa)) / (n * (n - 1)) + (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
           - 2 * kab.mean())
    return float(1000 * mmd)


def seam_ratio(img: np.ndarray, token: int, window: int, stride: int, offsets_px=None):
    """Mean |difference| of neighbouring pixels across window edges over the same at the other token
    boundaries, both directions pooled; and against every non-edge pixel pair. img: (C, H, W).
    Window edges: each window's start and end (tokens), or `offsets_px` = {axis: [pixel lines]}."""
    edge_sum = edge_n = tok_sum = tok_n = all_sum = all_n = 0.0
    for axis in (1, 2):
        d = np.abs(np.diff(img, axis=axis)).mean(axis=0)  # (H-1, W) or (H, W-1): pair k = lines k, k+1
        d = d.mean(axis=1 if axis == 1 else 0)  # per boundary line
        side = img.shape[axis]
        if offsets_px is not None:
            edges = set(offsets_px[axis])
        else:
            g, w, s = side // token, window, stride
            starts = list(range(0, g - w + 1, s))
            if starts[-1] != g - w:
                starts.append(g - w)
            edges = {o * token for o in starts} | {(o + w) * token for o in starts}
        edges -= {0, side}
        for k in range(len(d)):  # between pixel k and k + 1: boundary line k + 1
            line = k + 1
            if line in edges:
                edge_sum, edge_n = edge_sum + d[k], edge_n + 1
            else:
                all_sum, all_n = all_sum + d[k], all_n + 1
                if line % token == 0:
                    tok_sum, tok_n = tok_sum + d[k], tok_n + 1
    if not edge_n:
        return None
    edge = edge_sum / edge_n
    return {"ratio": edge / (tok_sum / tok_n), "ratio_all_pixels": edge / (all_sum / all_n),
            "edge_mean_abs_diff": edge, "token_boundary_mean_abs_diff": tok_sum / tok_n}


def measure(bundle: Path, absorb: Path, cfg, data, seed: int, quick: bool = False) -> dict:
    """All numbers of quality.json, from the shipped graphs: onnxruntime for the autoencoder and
    judge, the absorb binary for every generated image."""
    enc, dec = C.session(bundle / "encoder.onnx"), C.session(bundle / "decoder.onnx")
    judge = C.session(bundle / "eval" / "judge.onnx")
    ch, S, grid, K = cfg.n_channels, cfg.img_size, cfg.vq.token_size, cfg.codebook_size
    fake_class = len(data.names)
    gen = torch.Generator().manual_seed(seed + 3)
    count = 16 if quick else 256

    def run(s, name, x, out=0):
        return np.concatenate([s.run(None, {name: x[i:i + 256]})[out] for i in range(0, len(x), 256)])

    def judged(x):  # (N, C, S, S) -> features, P(real), predicted sources
        x = x.astype(np.float32)
        logits, feats = run(judge, JUDGE_INPUT, x, 0), run(judge, JUDGE_INPUT, x, 1)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return feats, p[:, :fake_class].sum(1), p[:, :fake_class].argmax(1)

    held = np.stack([read_png(p, ch) for p in sorted((bundle / "eval" / "heldout").glob("*.png"))])
    held_f, held_real, _ = judged(held)
    # One fixed scale for every comparison: held-out features at unit root mean square, so that
    # x.y / d is of order 1 in the kernel (raw ReLU features are large; the cubic would explode).
    unit = float(np.sqrt((held_f.astype(np.float64) ** 2).mean())) or 1.0
    held_f = held_f / unit

    def row(x, **extra):
        f, real, src = judged(x)
        return {**extra, "count": len(x), "kid_x1000": kid_x1000(f / unit, held_f), "real_probability": float(real.mean()),
                "source_histogram": np.bincount(src, minlength=fake_class).tolist()}

    rec = np.clip(run(dec, "tokens", run(enc, "image", held)), 0, 1)
    q = {"heldout_png_psnr_db": C.psnr_db(rec, held), "heldout_real_probability": float(held_real.mean())}
    from .images import fixed_set

    x_train, _ = fixed_set(data, "train", len(held), S, seed + 4)
    train_tokens = run(enc, "image", x_train.numpy())
    counts = np.bincount(train_tokens.ravel(), minlength=K)
    p = counts[counts > 0] / counts.sum()
    q["codebook_usage"] = float((counts > 0).sum() / K)
    q["codebook_perplexity"] = float(np.exp(-(p * np.log(p)).sum()))
    rand_t = torch.randint(0, K, (len(held), grid, grid), generator=gen).numpy()
    q["reference"] = {
        "train_crops": row(x_train.numpy()),
        "reconstructions": row(np.clip(run(dec, "tokens", train_tokens), 0, 1)),
        "random_tokens": row(np.clip(run(dec, "tokens", rand_t), 0, 1)),
        "shuffled_tokens": row(shuffle_np(train_tokens, dec, seed)),
    }

    with tempfile.TemporaryDirectory() as tmp:
        def generate(tag, *flags):
            out = Path(tmp) / tag
            cmd = [str(absorb), "generate", "--model", str(bundle), "--out", f"{out}/", *map(str, flags)]
            t0 = time.time()
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()[-600:]}")
            imgs = np.stack([read_png(p, ch) for p in sorted(out.glob("*.png"))])
            return imgs, round(time.time() - t0, 2)

        def sample_row(sampler, steps, temperature, seed_):
            imgs, sec = generate(f"{sampler}-{steps}-{temperature}-{seed_}", "--sampler", sampler, "--steps", steps,
                                 "--temperature", temperature, "--count", count, "--seed", seed_)
            return row(imgs, sampler=sampler, steps=steps, temperature=temperature, seconds=sec), imgs

        # The defaults: the lowest KID among the paper's sampler at cfg.steps and MaskGIT at
        # MASKGIT_STEPS, at each temperature, on samples of another seed (the table's are fresh).
        sampler, steps, temperature = cfg.sampler or "absorbing", cfg.steps, cfg.temperature
        if not temperature or not cfg.sampler:
            samplers = [(cfg.sampler, cfg.steps)] if cfg.sampler else [("absorbing", cfg.steps),
                                                                        ("maskgit", MASKGIT_STEPS)]
            cands = [(s, n, t) for s, n in samplers for t in ([cfg.temperature] if cfg.temperature else TEMPERATURES)]
            if quick:
                cands = cands[:1] + cands[-1:]
            q["selection"] = [sample_row(s, n, t, seed + 1000)[0] for s, n, t in cands]
            best = min(q["selection"], key=lambda r: r["kid_x1000"])
            sampler, steps, temperature = best["sampler"], best["steps"], best["temperature"]
        q["samples"], imgs = sample_row(sampler, steps, temperature, seed)
        to_png(grid_of(imgs[:64]), bundle / "samples.png")
        table = (8,) if quick else STEPS
        q["table"] = [q["samples"] if (s, st) == (sampler, steps) else sample_row(s, st, temperature, seed)[0]
                      for s in SAMPLERS for st in sorted(set(table) | {steps})]

        if data.mode == "crops":  # wide images: 4x the trained width, 2x its height
            size = f"{4 * S}x{2 * S}"
            defaults = ["--sampler", sampler, "--temperature", temperature, "--steps", steps]
            cands = []
            for a, b in TILE_CANDIDATES if not quick else TILE_CANDIDATES[:1]:
                stride, margin = max(1, grid // a), grid // b
                wide, sec = generate(f"wide-{stride}-{margin}", "--size", size, "--stride", stride,
                                     "--window-margin", margin, "--count", 4 if quick else 16, "--seed", seed,
                                     *defaults)
                ratios = [seam_ratio(w, S // grid, grid, stride) for w in wide]
                cands.append({"stride": stride, "margin": margin, "seconds": sec,
                              "ratio": float(np.mean([r["ratio"] for r in ratios])),
                              "ratio_all_pixels": float(np.mean([r["ratio_all_pixels"] for r in ratios]))})
            # the lowest ratio; among those within 0.02 of it, the cheapest (largest stride)
            best = min(c["ratio"] for c in cands)
            chosen = max((c for c in cands if c["ratio"] <= best + 0.02), key=lambda c: (c["stride"], -c["ratio"]))
            q["seams"] = {"size": size, "candidates": cands, **chosen, "bar": SEAM_BAR}
            # Does the new area continue the input? Held-out crops extended by a whole window to the
            # right; the judge names the source of that new window alone. The bundle's outpaint edge
            # (input tokens regenerated along each extended side) is the one that continues best on
            # other held-out crops than those reported.
            stems = [Path(n).stem for n in data.names]
            labels = np.array([stems.index(p.stem.split("_", 1)[1])
                               for p in sorted((bundle / "eval" / "heldout").glob("*.png"))])
            step = max(2, len(held) // (8 if quick else 64))  # chosen on other crops than reported
            chosen_on, report = np.arange(len(held))[step // 2::step], np.arange(len(held))[::step]

            def continuation(pick, edge, seed_):
                new = outpaint_right(absorb, bundle, held[pick], S, tmp, [*defaults, "--outpaint-edge", edge],
                                     chosen, seed_)
                return float((judged(new)[2] == labels[pick]).mean())

            edges = [{"edge": e, "same_source": continuation(chosen_on, e, seed + 1000)}
                     for e in range(grid // 4 + 1)]
            edge = max(edges, key=lambda r: (r["same_source"], -r["edge"]))["edge"]
            q["outpaint_edge"] = {"edge": edge, "candidates": edges, "count": len(chosen_on)}
            flags = [*defaults, "--outpaint-edge", edge]
            n_out = 4 if quick else 16
            q["outpaint"] = outpaint_seams(absorb, bundle, held[:n_out], grid, S // grid, tmp, flags, chosen, seed)
            q["outpaint"]["continuation"] = {
                "count": len(report), "extend_right_pixels": S,
                "same_source": continuation(report, edge, seed),
                "heldout_judged_correctly": float((judged(held[report])[2] == labels[report]).mean()),
                "unconditional_same_source": float((judged(imgs[:len(report)])[2] == labels[report]).mean())}
    return q


def shuffle_np(tokens: np.ndarray, dec, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    N = len(tokens)
    flat = tokens.reshape(N, -1).copy()
    for r in flat:
        rng.shuffle(r)
    x = flat.reshape(tokens.shape)
    return np.clip(np.concatenate([dec.run(None, {"tokens": x[i:i + 256]})[0] for i in range(0, N, 256)]), 0, 1)


def outpaint(absorb, bundle, x, tmp, tag, extend: str, flags, tiles, seed) -> np.ndarray:
    """`absorb outpaint` of the (C, S, S) image x; the result (C, H, W)."""
    src, out = Path(tmp) / f"{tag}-in.png", Path(tmp) / f"{tag}-out.png"
    to_png(x, src)
    cmd = [str(absorb), "outpaint", "--model", str(bundle), "--image", str(src), "--out", str(out),
           "--extend", extend, "--seed", str(seed), *map(str, flags), "--stride", str(tiles["stride"]),
           "--window-margin", str(tiles["margin"])]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()[-600:]}")
    return read_png(out, x.shape[0])


def outpaint_seams(absorb, bundle, held, grid, f, tmp, flags, tiles, seed):
    """Extend held-out crops by half a window on every side; the seam measure along the input's border
    (where generated pixels meet the kept input pixels) against the other token boundaries."""
    pad = (grid // 2) * f
    ratios = []
    for i, x in enumerate(held):
        y = outpaint(absorb, bundle, x, tmp, f"ring-{i}", f"left={pad},right={pad},up={pad},down={pad}", flags,
                     tiles, seed + i)
        S = x.shape[1]
        lines = {1: [pad, pad + S], 2: [pad, pad + S]}
        ratios.append(seam_ratio(y, f, grid, 1, offsets_px=lines)["ratio"])
    return {"extend_pixels_per_side": pad, "count": len(held), "ratio": float(np.mean(ratios))}


def outpaint_right(absorb, bundle, held, S, tmp, flags, tiles, seed) -> np.ndarray:
    """Each (C, S, S) crop extended by S pixels to the right; the new (C, S, S) part alone."""
    return np.stack([outpaint(absorb, bundle, x, tmp, f"right-{i}", f"right={S}", flags, tiles, seed + i)[:, :, S:]
                     for i, x in enumerate(held)])


def grid_of(imgs: np.ndarray, cols: int = 8, pad: int = 2) -> np.ndarray:
    """(N, C, S, S) -> (C, rows*(S+pad)+pad, ...) on mid grey."""
    n, c, s, _ = imgs.shape
    rows = math.ceil(n / cols)
    out = np.full((c, rows * (s + pad) + pad, cols * (s + pad) + pad), 0.5, dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, cols)
        out[:, pad + r * (s + pad):pad + r * (s + pad) + s, pad + k * (s + pad):pad + k * (s + pad) + s] = imgs[i]
    return out


def readme(q: dict, source: str, name: str) -> str:
    """The bundle's README.md: how it was made and what it measures (all from quality.json)."""
    c, s, sec, ref = q["config"], q["samples"], q["train_seconds"], q["reference"]
    grid = c["img_size"] // 2 ** (len(c["ch_mult"]) - 1)
    rows = "\n".join(f"| {r['sampler']} | {r['steps']} | {r['kid_x1000']:.1f} | {r['real_probability']:.3f} | "
                     f"{r['source_histogram']} | {r['seconds']:.1f} |" for r in q["table"])
    refs = "\n".join(f"| {k.replace('_', ' ')} | {v['kid_x1000']:.1f} | {v['real_probability']:.3f} |"
                     for k, v in ref.items())
    times = ", ".join(f"{k} {v:.0f} s" for k, v in sec.items())
    on = f"; autoencoder and prior on {q['device']}" if q.get("device", "cpu") != "cpu" else ""
    chosen = ("the lowest KID among " + ", ".join(f"{r['sampler']} {r['steps']} steps at {r['temperature']}"
                                                  for r in q["selection"]) + ", on samples of another seed"
              if "selection" in q else "as given")
    data = (f"random {c['img_size']}x{c['img_size']} crops of {len(q['sources'])} images ({', '.join(q['sources'])});"
            " the right-most 20% of each image is held out and never trained on" if q["mode"] == "crops" else
            f"whole {c['img_size']}x{c['img_size']} images; a fifth of the files is held out and never trained on")
    wide = ""
    if "seams" in q:
        sm, op = q["seams"], q["outpaint"]
        ct, oe = op["continuation"], q["outpaint_edge"]
        edges = ", ".join(f"{r['edge']}: {r['same_source']:.0%}" for r in oe["candidates"])
        edge = (f"The input's own tokens are kept except the outer **{oe['edge']}** along each extended side "
                f"(`sampling.outpaint_edge`): the encoder sees nothing beyond an image's border, so a crop's "
                f"outermost tokens are unlike those inside a larger image. Chosen by the measure below on "
                f"{oe['count']} other held-out crops (edge: same source): {edges}.\n")
        cands = ", ".join(f"stride {x['stride']} margin {x['margin']}: {x['ratio']:.3f}" for x in sm["candidates"])
        wide = f"""
## Larger images

`absorb generate --model models/{name} --size {sm['size']}` (4x the trained width, 2x its height) slides
overlapping windows of the trained {grid}x{grid} grid over the image. Seams are measured as the mean
absolute difference of neighbouring pixels across window edges over the same at the other token
boundaries (rows and columns pooled; 1.0 = no seam), on 16 images per setting: {cands}.
The bundle's default (`sampling.window_stride` and `window_margin` in model.json): stride
{sm['stride']}, margin {sm['margin']}, ratio **{sm['ratio']:.3f}** (against every other pixel pair:
{sm['ratio_all_pixels']:.3f}; bar {sm['bar']}).

Outpainting {op['count']} held-out crops by {op['extend_pixels_per_side']} pixels on every side: the same
ratio along the input's border, where generated pixels meet the kept ones: **{op['ratio']:.3f}**.
{edge}
Does the new area continue the input? {ct['count']} held-out crops extended by a whole window
({ct['extend_right_pixels']} pixels) to the right; the judge names the source of the new window alone: the
input's own source for **{ct['same_source']:.0%}** of them (the judge names the held-out crops themselves
correctly for {ct['heldout_judged_correctly']:.0%}; unconditional samples match those sources for
{ct['unconditional_same_source']:.0%}, chance).
"""
    return f"""# {name}: an absorbing-diffusion bundle trained by `python -m export train`

Generated by `{source}` from the repository root (code: `export/images.py`, `export/judge.py`,
`export/train.py`). Everything below is also in `eval/quality.json`.

- Data: {data}. `eval/heldout/` holds {ref['train_crops']['count']} held-out crops.
- Autoencoder: nf {c['nf']}, ch_mult {c['ch_mult']}, res_blocks {c['res_blocks']}, codebook {c['codebook_size']} x
  {c['emb_dim']}, {grid}x{grid} tokens; {c['ae_iters']} iterations at batch {c['ae_batch']}, then {c['denoise_iters']}
  decoder-only iterations on token grids with up to {c['token_noise']:.0%} random codes.
- Prior: {c['n_layers']} layers, width {c['n_emb']}, {c['n_head']} heads, {c['prior_iters']} iterations at batch
  {c['prior_batch']} on the tokens of 20,000 fixed training crops.
- Default sampling (model.json): {s['sampler']} sampler, {s['steps']} steps, temperature {s['temperature']}
  ({chosen}).
- Wall time ({q['threads']} torch threads, shared 2-core VM{on}): {times}.

## Quality (the shipped graphs; samples made by the absorb binary)

Reconstruction PSNR of the held-out crops (encode, decode, 8-bit): {q['heldout_png_psnr_db']:.2f} dB. Codebook
usage {q['codebook_usage']:.3f}, perplexity {q['codebook_perplexity']:.1f}.

KID x 1000 against the {ref['train_crops']['count']} held-out crops, on the features of `eval/judge.onnx` (a
small CNN trained to tell the sources apart and real crops from fakes; features scaled to unit root mean
square on the held-out crops; lower is better), and the
judge's mean probability that an image is real (held-out crops: {q['heldout_real_probability']:.3f}).
References:

| images | KID x 1000 | P(real) |
|---|---|---|
{refs}

{s['count']} samples per row at temperature {s['temperature']}:

| sampler | steps | KID x 1000 | P(real) | predicted source | seconds |
|---|---|---|---|---|---|
{rows}
{wide}
`samples.png`: 64 samples at the defaults.
"""
