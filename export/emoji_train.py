"""Train the `emoji` bundle (issue 40): 64x64 colour emoji on 16x16 tokens, class-conditional.

The data is emoji.py's (Noto and Twemoji at 64x64 on white, from npm; a held-out split of designs);
the stages are train.py's (VQ autoencoder with downsampling 4, decoder fine-tuning on noisy token
grids, a class-conditional absorbing prior), then a judge of its own (a CNN naming the class of an
emoji, or "not an emoji"), the export, and the measures (emoji_measure.py).

A run takes hours on a 2-core CPU. It checkpoints inside every stage (train.Progress) and stops
cleanly on SIGINT/SIGTERM or after --minutes; `--resume` goes on from the last checkpoint and gives
the same bytes as a run that never stopped:

    python -m export train-emoji --out models/emoji --minutes 100          # start; stops after 100 min
    python -m export train-emoji --out models/emoji --resume               # go on (next session)
    python -m export train-emoji --out /tmp/e --quick                      # smoke test, about a minute
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import emoji as E
from . import train as T
from .model import Autoencoder, PriorConfig, Transformer, VQConfig

PAUSED_EXIT = 3  # exit status of a run that stopped at a checkpoint (go on with --resume)


@dataclass
class EmojiConfig(T.Config):
    """train.Config with the emoji bundle's settings (sizes measured on a 2-core AVX2 EPYC: the
    autoencoder at nf 32 and batch 16 takes ~1.35 s per iteration, the prior at width 128, 8 layers,
    batch 24 on 256 tokens ~1.1 s)."""
    img_size: int = 64
    n_channels: int = 3
    nf: int = 32
    ch_mult: tuple = (1, 2, 4)  # downsampling 4: 16x16 tokens, the paper's grid
    # v2 (v1: 512 codes, "data" init, random restarts, no background code: pure-white patches took
    # 267 codes, perplexity 142, and the prior's samples were blobs). Measured after 200 autoencoder
    # iterations on the held-out set: 256 codes with spread init, farthest restarts and the
    # background code put white patches on 61 codes (perplexity 3.9), plain background on code 0 at
    # 84% through the nearest code alone.
    codebook_size: int = 256
    emb_dim: int = 64
    ae_iters: int = 1500
    ae_batch: int = 16
    ae_lr: float = 1e-3
    codebook_init: str = "spread"
    restart: str = "farthest"
    background_code: bool = True
    dead_code_every: int = 10
    # v4: the 256 codes are merged to 64 after the autoencoder (train.merge_codebook), before the
    # decoder stage. Measured on v3's autoencoder (held-out): swapping 10% of the tokens for each
    # one's nearest other code decodes at 42 dB from the original, so many codes are near twins;
    # merged to 64, reconstructions lose 0.25 dB (21.11 -> 20.86 dB) and the prior no longer spends
    # its loss on which twin the encoder picked (v3's prior, 2,171 iterations: 17-24% top-1 on the
    # non-background tokens with 90% of the grid given). 0 = no merge.
    codebook_merge: int = 64
    denoise_iters: int = 200
    # v2's prior (8 x 192, 3,000 iterations at 1e-3) was still making coloured blobs at 1,500
    # iterations (held-out loss 3.02, train loss the same: underfit, not overfit). Measured per
    # iteration at batch 24 on this CPU: 8 x 192 2.52 s, 8 x 128 1.13 s, 6 x 160 1.04 s. For the
    # same minutes, a model of half the size sees the data 2.2 times as often (v2: ~20 epochs).
    n_emb: int = 128
    n_head: int = 4
    n_layers: int = 8
    # v4: attention that falls with distance on the token grid (model.PriorConfig.attn_bias).
    # Measured, 600 iterations of 8 x 128 on the merged 64 codes: held-out loss 2.18 against 2.34
    # without it; given 90% of a held-out grid, its most likely tokens decode at 28.5 dB from the
    # reconstruction (27.4 without it; v3's prior on 256 codes: 26.9 at 600 and 28.7 at 2,171).
    attn_bias: bool = True
    prior_iters: int = 5000
    prior_batch: int = 24
    prior_lr: float = 2e-3
    warmup: int = 200
    steps: int = 16
    # the data (emoji.py): class scheme, skin-tone copies in or out
    scheme: str = E.DEFAULT_SCHEME
    skin_tones: bool = False
    judge_iters: int = 1000

    @property
    def n_classes(self) -> int:
        return len(E.class_names(self.scheme))

    @property
    def codes(self) -> int:
        """The codebook's size after the merge: the bundle's, the prior's."""
        return self.codebook_merge or self.codebook_size

    @property
    def vq(self) -> VQConfig:
        """The bundle's autoencoder (the merged codebook); stage 1 trains `stage1().vq`."""
        return replace(super().vq, codebook_size=self.codes)

    def stage1(self) -> "EmojiConfig":
        """The settings the autoencoder stage trains with: codebook_size codes, before any merge."""
        return replace(self, codebook_merge=0)

    @property
    def prior(self) -> PriorConfig:
        L = self.vq.token_size ** 2
        return PriorConfig(codebook_size=self.codes, bert_n_emb=self.n_emb, bert_n_head=self.n_head,
                           bert_n_layers=self.n_layers, block_size=L,
                           n_classes=self.n_classes if self.conditional else 0, attn_bias=self.attn_bias)


QUICK = dict(ae_iters=6, ae_batch=4, denoise_iters=2, prior_iters=6, prior_batch=4, warmup=2, n_layers=1, n_emb=32,
             n_head=4, nf=8, codebook_size=32, codebook_merge=16, emb_dim=16, steps=4, judge_iters=4,
             dead_code_every=3)
# The settings of each stage: a checkpoint made with other values of them cannot be resumed.
JUDGE_SETTINGS = ("judge_iters",)
# The settings of the stages after the autoencoder: --resume with other values of these keeps the
# autoencoder and trains the rest again (each later stage starts from its own seeds: a whole run).
LATER_SETTINGS = ("codebook_merge", "denoise_iters", "token_noise", "attn_bias") + T.PRIOR_SETTINGS + JUDGE_SETTINGS


class EmojiJudge(nn.Module):
    """The bundle's judge (eval/classifier.onnx): the class of a 64x64 emoji among the bundle's
    classes, or "not an emoji" (the last class). Its 128 pooled features are where KID is measured."""

    def __init__(self, n_classes: int):
        super().__init__()
        def conv(a, b, stride=1):
            return [nn.Conv2d(a, b, 3, stride=stride, padding=1), nn.ReLU()]
        self.features = nn.Sequential(
            *conv(3, 32, 2), *conv(32, 64), nn.MaxPool2d(2),  # 32x32, then 16x16
            *conv(64, 128), nn.MaxPool2d(2),                   # 8x8
            *conv(128, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(128, n_classes + 1)

    def forward(self, x):  # (B, 3, 64, 64) in [0, 1] -> ((B, classes + 1) logits, (B, 128) features)
        f = self.features(x)
        return self.head(f), f


def white_shift(x, max_shift: int, gen: torch.Generator):
    """Each image shifted by up to max_shift pixels each way, white fill (emoji sit on white)."""
    if max_shift == 0:
        return x
    return 1 - T.shift_batch(1 - x, max_shift, gen)


def judge_negatives(cfg: EmojiConfig, ae: Autoencoder, x, n: int, gen: torch.Generator):
    """What is not an emoji: decoded uniform and frequency-weighted random token grids, real token
    grids with their positions shuffled, smooth colour blobs and pixel noise."""
    from . import classifier as C
    from . import judge as J

    grid = cfg.vq.token_size
    with torch.no_grad():
        tokens = T.encode_all(ae, x)
    counts = torch.bincount(tokens.flatten(), minlength=cfg.codes).float()
    blobs = torch.cat([C.smooth_blobs(n // 4, cfg.img_size, gen) for _ in range(3)], 1)
    noise = torch.rand(n // 4, 3, cfg.img_size, cfg.img_size, generator=gen)
    return torch.cat([C.decode_random_tokens(ae, n // 2, grid, gen),
                      C.decode_random_tokens(ae, n // 2, grid, gen, counts / counts.sum()),
                      J.shuffled_tokens(ae, x[:n], gen), blobs, noise]).clamp(0, 1)


def train_judge(cfg: EmojiConfig, ae: Autoencoder, x, y, gen: torch.Generator) -> EmojiJudge:
    """Real train emoji and their reconstructions (decoder texture is no cue), labelled by class,
    against the negatives; shifted up to 3 pixels."""
    from . import classifier as C

    with torch.no_grad():
        t = T.encode_all(ae, x)
        rec = torch.cat([ae.decode_tokens(t[i:i + 128]).clamp(0, 1) for i in range(0, len(t), 128)])
    pos_x, pos_y = torch.cat([x, rec]), torch.cat([y, y])
    neg = judge_negatives(cfg, ae, x, max(64, min(len(x), 2048)), gen)
    return C.fit(EmojiJudge(cfg.n_classes), lambda m, b: m(b)[0], pos_x, pos_y, neg, cfg.n_classes,
                 cfg.judge_iters, gen, "judge", augment=lambda b: white_shift(b, 3, gen))


def export_judge(judge: EmojiJudge, path: Path):
    """eval/classifier.onnx: input `image` (B, 3, 64, 64), outputs `logits` and `features`; checked
    in onnxruntime against torch."""
    from . import classifier as C
    from . import judge as J

    path.parent.mkdir(parents=True, exist_ok=True)
    names = [J.JUDGE_LOGITS, J.JUDGE_FEATURES]
    judge = judge.eval()
    torch.onnx.export(judge, (torch.rand(2, 3, 64, 64),), str(path), input_names=[J.JUDGE_INPUT], output_names=names,
                      dynamic_axes={k: {0: "batch"} for k in [J.JUDGE_INPUT] + names}, opset_version=17,
                      dynamo=False)
    x = torch.rand(5, 3, 64, 64)
    with torch.no_grad():
        want = judge(x)[0].numpy()
    got = C.session(path).run([J.JUDGE_LOGITS], {J.JUDGE_INPUT: x.numpy()})[0]
    err = float(np.abs(got - want).max())
    assert err < 1e-3, f"classifier.onnx differs from torch by {err:.2e}"


def save_heldout(x, y, names: list[str], folder: Path):
    """eval/heldout/NNN_CLASS.png (class with spaces and punctuation as dashes)."""
    from . import judge as J

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    for i, (img, c) in enumerate(zip(x.numpy(), y.tolist())):
        J.to_png(img, folder / f"{i:04d}_{slug(names[c])}.png")


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")


def stage_settings(cfg: EmojiConfig) -> dict:
    """The settings the checkpoint depends on (all but the sampling defaults)."""
    return {k: v for k, v in asdict(cfg).items() if k not in T.SAMPLING_SETTINGS}


def train_stages(cfg: EmojiConfig, x_train, y_train, x_held, y_held, progress: T.Progress, dev):
    """The autoencoder, the prior and the judge, each taken from `progress` when it is done there.
    -> (ae, prior, judge, seconds per stage). Raises train.Paused when the run stops part way."""
    seconds = {}
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    ae = Autoencoder(cfg.vq if progress.done("decoder") else cfg.stage1().vq)
    done = progress.done("decoder") or progress.done("autoencoder")
    if done:
        ae.load_state_dict(done["ae"])
        gen.set_state(done["gen"])
        seconds["autoencoder"] = done["seconds"]
    if not progress.done("decoder"):
        if not progress.done("autoencoder"):
            t0, before = time.time(), spent_before(progress, "autoencoder")
            ae = T.train_autoencoder(cfg.stage1(), T.draw_from(x_train), gen, dev, progress)
            seconds["autoencoder"] = time.time() - t0 + before
            progress.finish("autoencoder", {"ae": ae.state_dict(), "gen": gen.get_state(),
                                            "seconds": seconds["autoencoder"]})
        t0 = time.time()
        if cfg.codebook_merge:  # deterministic: recomputed when the decoder stage resumes
            ae = T.merge_codebook(ae, cfg.codebook_merge, x_train, cfg.seed)
            print(f"merged the codebook: {cfg.codebook_size} -> {cfg.codebook_merge} codes ({time.time() - t0:.0f}s)")
        before = spent_before(progress, "decoder")
        ae = T.finetune_decoder(cfg, ae, T.draw_from(x_train), gen, dev, progress)
        seconds["autoencoder"] += time.time() - t0 + before
        progress.finish("decoder", {"ae": ae.state_dict(), "gen": gen.get_state(), "seconds": seconds["autoencoder"]})
    ae = ae.eval()

    prior = Transformer(cfg.prior)
    if progress.done("prior"):
        prior.load_state_dict(progress.done("prior")["prior"])
        seconds["prior"] = progress.done("prior")["seconds"]
    else:
        torch.manual_seed(cfg.seed)  # stage 2 from its own seeds, whatever stage 1 drew
        gen = torch.Generator().manual_seed(cfg.seed)
        tokens = T.encode_all(ae, x_train).flatten(1)
        held = T.encode_all(ae, x_held).flatten(1)
        t0, before = time.time(), spent_before(progress, "prior")
        prior = T.train_prior(cfg, tokens, gen, held=held, dev=dev, labels=y_train if cfg.conditional else None,
                              held_labels=y_held if cfg.conditional else None, progress=progress)
        seconds["prior"] = time.time() - t0 + before
        progress.finish("prior", {"prior": prior.state_dict(), "seconds": seconds["prior"]})
    prior = prior.eval()

    judge = EmojiJudge(cfg.n_classes)
    if progress.done("judge"):
        judge.load_state_dict(progress.done("judge")["judge"])
        seconds["judge"] = progress.done("judge")["seconds"]
    else:
        torch.manual_seed(cfg.seed + 1)  # the judge's initial weights, whatever ran before
        t0 = time.time()
        judge = train_judge(cfg, ae, x_train, y_train, torch.Generator().manual_seed(cfg.seed + 1))
        seconds["judge"] = time.time() - t0
        progress.finish("judge", {"judge": judge.state_dict(), "seconds": seconds["judge"]})
    return ae, prior, judge.eval(), seconds


def spent_before(progress: T.Progress, stage: str) -> float:
    """Seconds a stage had spent before this run resumed it (0 when it starts here)."""
    cur = progress.current(stage)
    return 0.0 if cur is None else float(cur["seconds"])


def main(argv=None):
    from . import emoji_measure as M
    from .export import OPSET, clear_stale, write_bundle

    p = argparse.ArgumentParser(prog="python -m export train-emoji", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write (e.g. models/emoji)")
    p.add_argument("--data", type=Path, default=E.DEFAULT_OUT,
                   help=f"where emoji-data keeps emoji/ (default {E.DEFAULT_OUT}; fetched when missing)")
    p.add_argument("--quick", action="store_true", help="a few iterations of a tiny model: a smoke test, not a model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--device", default="cpu", help=T.DEVICE_HELP)
    p.add_argument("--absorb", type=Path, default=Path(os.environ.get("ABSORB_BIN", "target/release/absorb")),
                   help="the absorb binary that measures the samples (default $ABSORB_BIN or target/release/absorb)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of EmojiConfig (e.g. --set prior_iters=4000)")
    p.add_argument("--checkpoint", type=Path,
                   help="the run's checkpoint file (default ~/.cache/absorb/checkpoints/emoji-seedN.pt)")
    p.add_argument("--resume", action="store_true", help="go on from --checkpoint (same settings)")
    p.add_argument("--minutes", type=float, default=0.0,
                   help="stop at a checkpoint after this many minutes of training (0: run to the end)")
    p.add_argument("--every", type=int, default=50, help="iterations between checkpoints (default 50)")
    args = p.parse_args(argv)
    absorb = args.absorb.resolve()
    if not absorb.is_file():
        p.error(f"--absorb {args.absorb} does not exist: build it first (make build)")
    try:
        cfg = EmojiConfig(seed=args.seed, **{**(QUICK if args.quick else {}), **T.overrides(args.set, EmojiConfig)})
        dev = T.device(args.device)
        cfg.n_classes  # the scheme exists
    except (ValueError, E.DataError) as e:
        p.error(str(e))
    torch.set_num_threads(args.threads or torch.get_num_threads())
    ckpt = args.checkpoint or Path.home() / ".cache" / "absorb" / "checkpoints" / (
        f"emoji-seed{cfg.seed}" + ("-quick" if args.quick else "") + ".pt")
    try:
        progress = T.Progress(ckpt, stage_settings(cfg), every=args.every, budget_s=args.minutes * 60,
                              resume=args.resume, first="autoencoder", later=LATER_SETTINGS)
        E.prepare(args.data)  # nothing to do when the images are there
        root = args.data / "emoji"
        x_train, y_train, _ = E.load(root, "train", cfg.scheme, cfg.skin_tones)
        x_held, y_held, held_rows = E.load(root, "heldout", cfg.scheme, cfg.skin_tones)
    except (ValueError, E.DataError) as e:
        sys.exit(f"train-emoji: {e}")
    commit = T.git_describe()
    print(f"train-emoji: {len(x_train)} train and {len(x_held)} held-out images, {cfg.n_classes} classes; "
          f"{asdict(cfg)} at {commit}; checkpoint {ckpt}")
    progress.watch_signals()
    try:
        ae, prior, judge, seconds = train_stages(cfg, x_train, y_train, x_held, y_held, progress, dev)
    except T.Paused as e:
        print(f"train-emoji: {e}. Go on with the same command and --resume.")
        sys.exit(PAUSED_EXIT)

    t0 = time.time()
    names = E.class_names(cfg.scheme)
    flags = f"--out {args.out} --seed {cfg.seed}" + (" --quick" if args.quick else "")
    flags += "".join(f" --set {kv}" for kv in args.set)
    source = f"python -m export train-emoji {flags} at {commit}"
    out = args.out
    clear_stale(out)
    # One emoji per image: windows of a larger grid must not overlap (each would draw its own emoji).
    tiles = dict(window_stride=(cfg.vq.token_size,) * 2, window_margin=(0, 0))
    write_bundle(ae, prior, cfg.vq, cfg.prior, out, name="emoji", steps=cfg.steps, temperature=cfg.temperature or 1.0,
                 source=source, classes=names, **tiles)
    export_judge(judge, out / "eval" / "classifier.onnx")
    save_heldout(x_held, y_held, names, out / "eval" / "heldout")
    seconds["export"] = time.time() - t0
    t0 = time.time()
    q = M.measure(out, absorb, cfg, x_train, y_train, y_held, seed=cfg.seed, quick=args.quick)
    seconds["measure"] = time.time() - t0
    seconds = {k: round(v, 1) for k, v in seconds.items()}
    seconds["total"] = round(sum(seconds.values()), 1)
    q = {**q, "train_seconds": seconds, "config": asdict(cfg), "classes": names, "commit": commit, "opset": OPSET,
         "threads": torch.get_num_threads(), "device": str(dev)}
    M.ship(out, q, ae, prior, cfg, source, names, tiles, write_bundle)
    print(f"wrote {out}: {json.dumps(q['samples'])}; {seconds}")
