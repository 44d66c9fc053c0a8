"""Checkpoint-compatible PyTorch modules of Unleashing Transformers (Bond et al., ECCV 2022).

The VQGAN autoencoder (encoder, nearest-code quantizer, generator) and the absorbing-diffusion
denoiser (a bidirectional pre-LN transformer). Parameter names and shapes equal the official
checkpoints' (minus the leading "ae." / "_denoise_fn."); docs/design.md describes the bundle they
export to.
This file holds no loading, exporting or training code: see export.py and train.py.

    from export.model import VQConfig, PriorConfig, Autoencoder, Transformer, PRESETS
    vq, pc = PRESETS["churches"]
    ae, prior = Autoencoder(vq), Transformer(pc)
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VQConfig:
    img_size: int = 256
    n_channels: int = 3
    nf: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)
    res_blocks: int = 2
    attn_resolutions: tuple = (16,)
    codebook_size: int = 1024
    emb_dim: int = 256
    norm_groups: int = 32  # official GroupNorm(32, eps=1e-6); configurable so tiny models fit
    beta: float = 0.25  # commitment weight, training only
    # images on a white background (emoji): token positions whose patch and BACKGROUND_MARGIN
    # pixels around it are pure white take code 0, in training and in the exported encoder
    # (background_positions); off: the nearest code everywhere
    background_code: bool = False

    @property
    def token_size(self) -> int:
        """Side of the token grid: each level but the last halves the image."""
        return self.img_size // 2 ** (len(self.ch_mult) - 1)


@dataclass
class PriorConfig:
    codebook_size: int = 1024
    bert_n_emb: int = 512
    bert_n_head: int = 8
    bert_n_layers: int = 24
    block_size: int = 256  # = L = h*w
    # > 0: a class-conditional prior (not the paper's): one more input, the class of each row, whose
    # embedding is added at every position; -1 = no class (its own row, learned too)
    n_classes: int = 0
    # True: each head's attention logits fall with the distance between the two positions on the
    # token grid (block_size must be a square), -exp(s_h) * distance with s_h learned per head and
    # layer, from ALiBi's slopes 1, 1/2, 1/4, ... (not the paper's prior). Measured on the emoji
    # tokens (64 codes, 8 x 128): held-out loss 2.73 against 3.06 after 250 iterations, 2.25
    # against 2.46 after 500: a transformer without it has to learn from the data which
    # positions are near.
    attn_bias: bool = False

    @property
    def mask_id(self) -> int:
        return self.codebook_size  # the absorbing state is the extra, last row of tok_emb


# The three released models share one architecture (spec 1.2/1.3); only training differed.
PRESETS = {name: (VQConfig(), PriorConfig()) for name in ("churches", "bedrooms", "ffhq")}


# ---------------------------------------------------------------------------------------------
# VQGAN


def normalize(cfg: VQConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6, affine=True)


def swish(x):
    return x * torch.sigmoid(x)


class ResBlock(nn.Module):
    def __init__(self, cfg: VQConfig, c_in: int, c_out: int):
        super().__init__()
        self.c_in, self.c_out = c_in, c_out
        self.norm1 = normalize(cfg, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = normalize(cfg, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        # the official code creates the 1x1 shortcut in every block, so every checkpoint holds it;
        # it is applied only when the channel count changes
        self.conv_out = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):  # (B, Ci, H, W) -> (B, Co, H, W)
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.c_in != self.c_out:
            x = self.conv_out(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, 1x1 convs for q, k, v and the output."""

    def __init__(self, cfg: VQConfig, c: int):
        super().__init__()
        self.scale = c**-0.5
        self.norm = normalize(cfg, c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):  # (B, C, H, W)
        h = self.norm(x)
        q = self.q(h).flatten(2)  # (B, C, N), N = H*W; flatten keeps H, W dynamic in ONNX
        k = self.k(h).flatten(2)
        v = self.v(h).flatten(2)
        att = torch.bmm(q.transpose(1, 2), k) * self.scale  # (B, N, N) query x key
        att = F.softmax(att, dim=2)
        h = torch.bmm(v, att.transpose(1, 2))  # (B, C, N)
        return x + self.proj_out(h.reshape_as(x))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # zero pad right and bottom only


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """Image in [0, 1] -> z_e. A flat `blocks` list, in the official order for any config."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        nf, res = cfg.nf, cfg.img_size
        blocks = [nn.Conv2d(cfg.n_channels, nf, 3, padding=1)]
        c = nf
        for i, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.res_blocks):
                blocks.append(ResBlock(cfg, c, nf * mult))
                c = nf * mult
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(cfg, c))
            if i != len(cfg.ch_mult) - 1:
                blocks.append(Downsample(c))
                res //= 2
        blocks += [ResBlock(cfg, c, c), AttnBlock(cfg, c), ResBlock(cfg, c, c)]
        # no swish between the final norm and conv (unlike Taming/diffusers)
        blocks += [normalize(cfg, c), nn.Conv2d(c, cfg.emb_dim, 3, padding=1)]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):  # (B, C, H, W) -> (B, emb_dim, h, w)
        for block in self.blocks:
            x = block(x)
        return x


class Generator(nn.Module):
    """z_q -> image (unclamped, read as [0, 1]). Fully convolutional: any h, w."""

    def __init__(self, cfg: VQConfig, logsigma: bool = False):
        super().__init__()
        nf, res = cfg.nf, cfg.token_size
        c = nf * cfg.ch_mult[-1]
        blocks = [nn.Conv2d(cfg.emb_dim, c, 3, padding=1)]
        blocks += [ResBlock(cfg, c, c), AttnBlock(cfg, c), ResBlock(cfg, c, c)]
        for i in reversed(range(len(cfg.ch_mult))):
            for _ in range(cfg.res_blocks):
                blocks.append(ResBlock(cfg, c, nf * cfg.ch_mult[i]))
                c = nf * cfg.ch_mult[i]
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(cfg, c))
            if i != 0:
                blocks.append(Upsample(c))
                res *= 2
        blocks += [normalize(cfg, c), nn.Conv2d(c, cfg.n_channels, 3, padding=1)]
        self.blocks = nn.ModuleList(blocks)
        if logsigma:  # ELBO experiment head in the official model; never used for sampling
            self.logsigma = nn.Sequential(
                nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, cfg.n_channels, 1)
            )

    def forward(self, z):  # (B, emb_dim, h, w) -> (B, C, H, W)
        for block in self.blocks:
            z = block(z)
        return z


BACKGROUND_WHITE = 0.98
BACKGROUND_MARGIN = 2


def background_positions(x, down: int, margin: int = BACKGROUND_MARGIN, white: float = BACKGROUND_WHITE):
    """(B, C, S, S) in [0, 1] -> (B, S/down, S/down) bool: token positions whose down x down patch
    and `margin` pixels around it are all white in every channel."""
    ink = (x.min(1, keepdim=True).values < white).float()  # (B, 1, S, S)
    if margin:
        ink = F.max_pool2d(ink, 2 * margin + 1, stride=1, padding=margin)
    return F.max_pool2d(ink, down, stride=down)[:, 0] == 0


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.emb_dim)
        k = cfg.codebook_size
        self.embedding.weight.data.uniform_(-1.0 / k, 1.0 / k)  # the official init

    def tokens(self, z_e):  # (B, D, h, w) -> (B, h, w) int64
        z = z_e.permute(0, 2, 3, 1)  # (B, h, w, D)
        e = self.embedding.weight  # (K, D)
        d = (z**2).sum(-1, keepdim=True) + (e**2).sum(1) - 2 * z @ e.t()  # (B, h, w, K)
        return d.argmin(-1)  # first index on ties

    def lookup(self, tokens):  # (B, h, w) int64 -> (B, D, h, w)
        return F.embedding(tokens, self.embedding.weight).permute(0, 3, 1, 2)


class Autoencoder(nn.Module):
    """The official `VQAutoEncoder` with the nearest quantizer; keys == `ae.*` minus "ae."."""

    def __init__(self, cfg: VQConfig, logsigma: bool = False):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.generator = Generator(cfg, logsigma=logsigma)

    def encode(self, x):  # (B, C, H, W) in [0, 1] -> (B, emb_dim, h, w)
        return self.encoder(x)

    def quantize_tokens(self, z_e):  # (B, emb_dim, h, w) -> (B, h, w) int64
        return self.quantize.tokens(z_e)

    def background(self, x):  # (B, C, H, W) -> (B, h, w) bool, or None without a background code
        if not self.cfg.background_code:
            return None
        return background_positions(x, self.cfg.img_size // self.cfg.token_size)

    def tokens(self, x):
        """(B, C, H, W) in [0, 1] -> (B, h, w) int64: the nearest codes, and code 0 on plain
        background with `background_code` (what the exported encoder computes)."""
        tokens = self.quantize_tokens(self.encode(x))
        bg = self.background(x)
        return tokens if bg is None else tokens.masked_fill(bg, 0)

    def decode_tokens(self, tokens):  # (B, h, w) int64 -> (B, C, H, W), unclamped
        return self.generator(self.quantize.lookup(tokens))

    def forward(self, x):
        """Training pass: (x_rec, vq_loss, tokens), straight-through gradients to the encoder;
        with `background_code`, plain background takes code 0 whatever code is nearest."""
        z = self.encode(x)  # (B, D, h, w)
        tokens = self.quantize_tokens(z)  # (B, h, w)
        bg = self.background(x)
        if bg is not None:
            tokens = tokens.masked_fill(bg, 0)
        z_q = self.quantize.lookup(tokens)
        # weights as in the official VectorQuantizer: 1 on the encoder term, beta on the codebook
        vq_loss = F.mse_loss(z, z_q.detach()) + self.cfg.beta * F.mse_loss(z_q, z.detach())
        z_q = z + (z_q - z).detach()
        return self.generator(z_q), vq_loss, tokens


# ---------------------------------------------------------------------------------------------
# Absorbing-diffusion denoiser


class SelfAttention(nn.Module):
    """Multi-head attention with no mask: the official `CausalSelfAttention` at causal=False."""

    def __init__(self, pc: PriorConfig, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout  # the reference's attn_pdrop and resid_pdrop (0 in its configs)
        d, nh = pc.bert_n_emb, pc.bert_n_head
        assert d % nh == 0, f"bert_n_emb {d} is not divisible by bert_n_head {nh}"
        self.n_head, self.head_size = nh, d // nh
        self.key = nn.Linear(pc.bert_n_emb, pc.bert_n_emb)
        self.query = nn.Linear(pc.bert_n_emb, pc.bert_n_emb)
        self.value = nn.Linear(pc.bert_n_emb, pc.bert_n_emb)
        self.proj = nn.Linear(pc.bert_n_emb, pc.bert_n_emb)
        if pc.attn_bias:
            side = math.isqrt(pc.block_size)
            if side * side != pc.block_size:
                raise ValueError(f"attn_bias needs a square token grid; block_size is {pc.block_size}")
            r = torch.arange(pc.block_size)
            dy, dx = r[:, None] // side - r[None] // side, r[:, None] % side - r[None] % side
            self.register_buffer("dist", (dy * dy + dx * dx).float().sqrt(), persistent=False)  # (L, L)
            self.slope = nn.Parameter(torch.tensor([-i * math.log(2.0) for i in range(nh)]))  # log slopes

    def bias(self, rows):
        """The distance bias of the query positions `rows` ((L,) or (B, Q) int64) against every
        position: (nh, L, L) or (B, nh, Q, L); None without attn_bias."""
        if not hasattr(self, "slope"):
            return None
        d = self.dist[rows]
        return -self.slope.exp().view(-1, 1, 1) * (d if d.dim() == 2 else d[:, None])

    def forward(self, x):  # (B, L, D)
        B, L, D = x.shape
        hs = self.head_size
        k = self.key(x).view(B, L, self.n_head, hs).transpose(1, 2)  # (B, nh, L, hs)
        q = self.query(x).view(B, L, self.n_head, hs).transpose(1, 2)
        v = self.value(x).view(B, L, self.n_head, hs).transpose(1, 2)
        logits = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(hs))  # (B, nh, L, L)
        bias = self.bias(torch.arange(L, device=x.device))
        att = F.softmax(logits if bias is None else logits + bias[..., :L], dim=-1)
        att = drop(att, self.dropout, self.training)
        y = (att @ v).transpose(1, 2).reshape(B, L, D)  # (B, L, D)
        return drop(self.proj(y), self.dropout, self.training)


def drop(x, p: float, training: bool):
    """Dropout only while training with p > 0: at p = 0 no op is traced, so exported graphs are
    the same with or without the option."""
    return F.dropout(x, p, True) if training and p > 0 else x


class Block(nn.Module):
    def __init__(self, pc: PriorConfig, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(pc.bert_n_emb)
        self.ln2 = nn.LayerNorm(pc.bert_n_emb)
        self.attn = SelfAttention(pc, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(pc.bert_n_emb, 4 * pc.bert_n_emb),
            nn.GELU(),  # exact (erf) form
            nn.Linear(4 * pc.bert_n_emb, pc.bert_n_emb),
        )

    def forward(self, x):  # (B, L, D)
        x = x + self.attn(self.ln1(x))
        return x + drop(self.mlp(self.ln2(x)), self.dropout, self.training)


class Transformer(nn.Module):
    """Masked tokens -> logits over the codebook. Not conditioned on t; keys == `_denoise_fn.*`."""

    def __init__(self, pc: PriorConfig, dropout: float = 0.0):
        """dropout: on the embeddings, attention weights and residual branches while training
        (the reference's embd/attn/resid_pdrop as one number); no parameters, so checkpoints and
        exported graphs do not depend on it."""
        super().__init__()
        self.cfg = pc
        self.dropout = dropout
        d = pc.bert_n_emb
        self.tok_emb = nn.Embedding(pc.codebook_size + 1, d)  # + 1 row for the mask token
        self.pos_emb = nn.Parameter(torch.zeros(1, pc.block_size, d))
        self.start_tok = nn.Parameter(torch.zeros(1, 1, d))  # autoregressive baseline only; unused
        self.blocks = nn.Sequential(*[Block(pc, dropout) for _ in range(pc.bert_n_layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, pc.codebook_size, bias=False)  # no logit for the mask id
        # the official _init_weights is never applied; for training from scratch use GPT's init
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos_emb, std=0.02)
        if pc.n_classes:  # created last, so an unconditional prior's initial weights stay as they were
            self.class_emb = nn.Embedding(pc.n_classes + 1, d)  # + 1 row for "no class"
            nn.init.normal_(self.class_emb.weight, std=0.02)

    def forward(self, tokens, classes=None):  # (B, L) int64 in 0..=K, (B,) in 0..=C -> (B, L, K) float32
        L = tokens.shape[1]
        if not torch.jit.is_tracing():
            assert L <= self.cfg.block_size, f"length {L} > block_size {self.cfg.block_size}"
        x = self.tok_emb(tokens) + self.pos_emb[:, :L, :]  # (B, L, D)
        if self.cfg.n_classes:
            if classes is None:
                classes = torch.full(tokens.shape[:1], -1, dtype=torch.long, device=tokens.device)
            # -1 (export/feed.py's NO_CLASS) is the last row: callers need not know the class count
            x = x + self.class_emb(torch.where(classes < 0, self.cfg.n_classes, classes))[:, None, :]
        x = drop(x, self.dropout, self.training)
        x = self.ln_f(self.blocks(x))
        return self.head(x)  # (B, L, K)
