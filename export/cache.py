"""Cached attention between steps (issue 39): one more transformer graph next to a bundle's own.

Between two calls of the reverse process most positions keep their token, so their keys and values
barely move. absorb alternates full passes, which refresh a cache of every layer's keys and values,
with cheap passes that compute only the positions a step needs (and those whose token changed since
the cache was made); those attend to the cached keys and values of all the others.

    transformer.cached.onnx   tokens (B, Q), positions (B, Q) [, class (B)], keys (N, B, L, D),
                              values (N, B, L, D) -> logits (B, Q, K),
                              new_keys (N, B, Q, D), new_values (N, B, Q, D)

N layers, width D; `keys`/`values` of layer l are its attention's key and value projections of the
layer's normed input, before the split into heads. The query positions' own keys and values are
computed afresh and written over the cache's before attending, so a position whose token changed
sees itself as it is now, and `new_keys`/`new_values` return them for the host to keep its cache
current. Given every position (Q = L), the cache's old contents are all overwritten: that is a
full pass, equal to transformer.onnx, and its new keys and values are the whole fresh cache. One
graph thus serves both passes and the weights are stored once more, not twice. A cheap pass with
a freshly computed cache equals the full pass at its positions (checked at export and in
test_cache.py).

`cache.json` names the file with its sha256 and the sha256 of the `transformer.onnx` whose weights
it carries; model.json is not touched, so a bundle's identity (and every PNG made in exact mode) is
what it was. `python -m export cache --bundle DIR` adds the graph to an existing bundle, rebuilding
the torch module from its transformer.onnx (checked to give the same logits).
"""

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import PriorConfig, Transformer

CACHE_FILE = "cache.json"
FORMAT = "absorb-cache/1"
CACHED_FILE = "transformer.cached.onnx"
PARITY_ATOL = 1e-4


class CacheError(Exception):
    """A bundle the cache graphs cannot be made for, or graphs that do not match the module."""


def _classes(prior: Transformer, classes, batch: int):
    if classes is None:
        classes = torch.full((batch,), -1, dtype=torch.long)
    return prior.class_emb(torch.where(classes < 0, prior.cfg.n_classes, classes))[:, None, :]


def _heads(x, nh: int):  # (B, T, D) -> (B, nh, T, hs)
    B, T, D = x.shape
    return x.view(B, T, nh, D // nh).transpose(1, 2)


class Partial(nn.Module):
    """A cheap pass: only the query positions, attending to the cache (module docs)."""

    def __init__(self, prior: Transformer):
        super().__init__()
        self.prior = prior

    def forward(self, tokens, positions, keys, values, classes=None):
        p = self.prior
        B, Q = tokens.shape
        D = p.cfg.bert_n_emb
        x = p.tok_emb(tokens) + p.pos_emb[0][positions]  # (B, Q, D)
        if p.cfg.n_classes:
            x = x + _classes(p, classes, B)
        index = positions[:, :, None].expand(B, Q, D)
        new_k, new_v = [], []
        for i, block in enumerate(p.blocks):
            a = block.attn
            h = block.ln1(x)
            k, q, v = a.key(h), a.query(h), a.value(h)
            new_k.append(k)
            new_v.append(v)
            K = keys[i].scatter(1, index, k)  # the cache with the query positions as they are now
            V = values[i].scatter(1, index, v)
            logits = _heads(q, a.n_head) @ _heads(K, a.n_head).transpose(-2, -1) / math.sqrt(a.head_size)
            bias = a.bias(positions)  # (B, nh, Q, L): the query positions' rows
            att = F.softmax(logits if bias is None else logits + bias, -1)
            y = (att @ _heads(V, a.n_head)).transpose(1, 2).reshape(B, Q, D)
            x = x + a.proj(y)
            x = x + block.mlp(block.ln2(x))
        return p.head(p.ln_f(x)), torch.stack(new_k), torch.stack(new_v)


def _export(module, args, path: Path, inputs, outputs, axes):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=17, do_constant_folding=True, dynamo=False)
    onnx.checker.check_model(str(path), full_check=True)


def export_cached(prior: Transformer, out_dir: Path) -> dict:
    """Writes transformer.cached.onnx for `prior` into out_dir and checks it in onnxruntime against
    the module (check_parity); returns the parity report."""
    prior = prior.eval()
    pc = prior.cfg
    out_dir = Path(out_dir)
    L, K, N, D = pc.block_size, pc.codebook_size, pc.bert_n_layers, pc.bert_n_emb
    g = torch.Generator().manual_seed(0)
    cond = bool(pc.n_classes)
    Q = max(1, L // 4)
    tokens = torch.randint(0, K + 1, (2, Q), generator=g)
    positions = torch.stack([torch.randperm(L, generator=g)[:Q] for _ in range(2)])
    keys, values = torch.randn(N, 2, L, D, generator=g), torch.randn(N, 2, L, D, generator=g)
    classes = torch.tensor([0, -1]) if cond else None
    names = ["tokens", "positions"] + (["class"] if cond else []) + ["keys", "values"]
    outputs = ["logits", "new_keys", "new_values"]
    axes = {"tokens": {0: "batch", 1: "query"}, "positions": {0: "batch", 1: "query"}, "class": {0: "batch"},
            "keys": {1: "batch"}, "values": {1: "batch"}, "logits": {0: "batch", 1: "query"},
            "new_keys": {1: "batch", 2: "query"}, "new_values": {1: "batch", 2: "query"}}
    part = Partial(prior)

    class Ordered(nn.Module):  # the graph's input order: tokens, positions, [class], keys, values
        def __init__(self):
            super().__init__()
            self.part = part

        def forward(self, *a):
            if cond:
                t, pos, c, k, v = a
                return self.part(t, pos, k, v, c)
            t, pos, k, v = a
            return self.part(t, pos, k, v)

    args = (tokens, positions, classes, keys, values) if cond else (tokens, positions, keys, values)
    _export(Ordered(), args, out_dir / CACHED_FILE, names, outputs, {k: v for k, v in axes.items() if k in names + outputs})
    return check_parity(prior, out_dir)


def session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def feed(tokens, positions, keys, values, classes=None) -> dict:
    """The cached graph's inputs (numpy)."""
    f = {"tokens": tokens, "positions": positions, "keys": keys, "values": values}
    return f | ({"class": classes} if classes is not None else {})


def check_parity(prior: Transformer, out_dir: Path, atol: float = PARITY_ATOL) -> dict:
    """The graph in onnxruntime against the module, batch 1 and 3: a full pass (every position, in
    a shuffled order, over a cache of noise) equals the transformer's logits; a cheap pass at a tenth
    and at half of the positions, with the cache that full pass returned, equals them at its
    positions and returns the cache's keys there. Raises CacheError beyond atol."""
    pc = prior.cfg
    L, K, N, D = pc.block_size, pc.codebook_size, pc.bert_n_layers, pc.bert_n_emb
    s = session(out_dir / CACHED_FILE)
    cond = bool(pc.n_classes)
    g = torch.Generator().manual_seed(1)
    worst = {"full": 0.0, "partial": 0.0, "new_keys": 0.0}
    for batch in (1, 3):
        tokens = torch.randint(0, K + 1, (batch, L), generator=g)
        classes = torch.randint(-1, pc.n_classes, (batch,), generator=g).numpy() if cond else None
        with torch.no_grad():
            want = prior(tokens, None if classes is None else torch.from_numpy(classes)).numpy()
        tokens = tokens.numpy()
        order = torch.stack([torch.randperm(L, generator=g) for _ in range(batch)]).numpy()
        noise = torch.randn(2, N, batch, L, D, generator=g).numpy()
        logits, k_order, v_order = s.run(None, feed(np.take_along_axis(tokens, order, 1), order, noise[0], noise[1],
                                                    classes))
        worst["full"] = max(worst["full"], float(np.abs(logits - np.take_along_axis(want, order[:, :, None], 1)).max()))
        keys, values = np.empty_like(k_order), np.empty_like(v_order)  # back to raster order
        np.put_along_axis(keys, order[None, :, :, None], k_order, 2)
        np.put_along_axis(values, order[None, :, :, None], v_order, 2)
        for share in (0.1, 0.5):
            Q = max(1, int(L * share))
            positions = order[:, :Q].copy()
            p_logits, new_k, _ = s.run(None, feed(np.take_along_axis(tokens, positions, 1), positions, keys, values,
                                                  classes))
            at = np.take_along_axis(want, positions[:, :, None], 1)
            worst["partial"] = max(worst["partial"], float(np.abs(p_logits - at).max()))
            cached = np.take_along_axis(keys, positions[None, :, :, None], 2)
            worst["new_keys"] = max(worst["new_keys"], float(np.abs(new_k - cached).max()))
    bad = {k: v for k, v in worst.items() if not v <= atol}
    if bad:
        raise CacheError(f"the cached graph differs from the module beyond {atol}: {bad}")
    return {"max_abs_diff": worst, "atol": atol}


def write_cache(prior: Transformer, out_dir: Path) -> dict:
    """The cached graph and cache.json in the bundle at out_dir (whose transformer.onnx holds `prior`)."""
    from .export import sha256_of

    out_dir = Path(out_dir)
    parity = export_cached(prior, out_dir)
    pc = prior.cfg
    doc = {"format": FORMAT, "transformer_sha256": sha256_of(out_dir / "transformer.onnx"),
           "layers": pc.bert_n_layers, "width": pc.bert_n_emb,
           "file": CACHED_FILE, "sha256": sha256_of(out_dir / CACHED_FILE),
           "parity": parity}
    tmp = out_dir / (CACHE_FILE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(out_dir / CACHE_FILE)
    return doc


# ---------------------------------------------------------------------------------------------
# the torch module back from a bundle's transformer.onnx


def prior_from_onnx(path: Path, pc: PriorConfig) -> Transformer:
    """The Transformer whose export is `path`, found by the graph's structure (the exporter folds
    equal tensors, such as an untrained model's LayerNorm weights, into one initializer, so names
    alone do not do): the MatMuls by a weight, in the order the forward pass runs them (each block's
    key, query, value, proj, mlp.0, mlp.2, then the head), each with the bias its Add adds; the
    LayerNormalizations in order (each block's ln1, ln2, then ln_f); the embeddings by name.
    Checked: the module's logits equal the graph's (CacheError otherwise)."""
    model = onnx.load(str(path))
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:  # a folded duplicate is an Identity of the one kept
        if n.op_type == "Identity" and n.input[0] in init:
            init[n.output[0]] = init[n.input[0]]
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def t(a):
        return torch.from_numpy(np.array(a, copy=True))

    linears = [f"blocks.{b}.{name}" for b in range(pc.bert_n_layers)
               for name in ("attn.key", "attn.query", "attn.value", "attn.proj", "mlp.0", "mlp.2")] + ["head"]
    norms = [f"blocks.{b}.{name}" for b in range(pc.bert_n_layers) for name in ("ln1", "ln2")] + ["ln_f"]
    matmuls = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in init]
    lns = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    if len(matmuls) != len(linears) or len(lns) != len(norms):
        raise CacheError(f"{path}: {len(matmuls)} weight products and {len(lns)} layer norms, expected "
                         f"{len(linears)} and {len(norms)} for {pc.bert_n_layers} layers")
    state = {}
    for name, mm in zip(linears, matmuls):
        if mm.op_type != "MatMul":
            raise CacheError(f"{path}: {name} is a {mm.op_type}, expected a MatMul")
        state[f"{name}.weight"] = t(init[mm.input[1]].T)
        if name != "head":
            adds = [a for a in consumers.get(mm.output[0], []) if a.op_type == "Add"]
            bias = [i for a in adds for i in a.input if i in init]
            if len(bias) != 1:
                raise CacheError(f"{path}: no single bias added after {name}'s MatMul")
            state[f"{name}.bias"] = t(init[bias[0]])
    for name, ln in zip(norms, lns):
        state[f"{name}.weight"], state[f"{name}.bias"] = t(init[ln.input[1]]), t(init[ln.input[2]])
    prior = Transformer(pc)
    for name in ("tok_emb.weight", "pos_emb", "class_emb.weight"):
        if name in prior.state_dict():
            if name not in init:
                raise CacheError(f"{path}: no initializer {name}")
            state[name] = t(init[name])
    state["start_tok"] = prior.start_tok.detach().clone()  # unused by the forward pass
    prior.load_state_dict(state)
    prior.eval()
    check_rebuilt(prior, path)
    return prior


def check_rebuilt(prior: Transformer, path: Path, atol: float = PARITY_ATOL):
    pc = prior.cfg
    s = session(path)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, pc.codebook_size + 1, (2, pc.block_size), generator=g)
    classes = torch.tensor([0, -1]) if pc.n_classes else None
    with torch.no_grad():
        want = prior(tokens, classes).numpy()
    feed = {"tokens": tokens.numpy()} | ({"class": classes.numpy()} if pc.n_classes else {})
    got = s.run(None, feed)[0]
    err = float(np.abs(got - want).max())
    if not err <= atol:
        raise CacheError(f"{path}: the module rebuilt from the graph differs from it by {err:.2e}")


def add_to_bundle(bundle: Path) -> dict:
    """The cached graph for an existing bundle (its model.json's hparams, its transformer.onnx)."""
    from .export import PRIOR_KEYS

    manifest = json.loads((bundle / "model.json").read_text())
    hp = manifest["provenance"]["hparams"]
    if hp.get("attn_bias", False):
        raise CacheError(f"{bundle}: a prior with attn_bias cannot be rebuilt from its graph (the bias is "
                         f"folded into constants); its trainer writes the cached graph")
    pc = PriorConfig(**{k: hp[k] for k in PRIOR_KEYS}, codebook_size=manifest["tokens"]["codebook_size"],
                     n_classes=hp.get("n_classes", 0))
    prior = prior_from_onnx(bundle / manifest["graphs"]["transformer"]["file"], pc)
    return write_cache(prior, bundle)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m export cache", description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, required=True, action="append",
                   help="bundle directory to add the cached graph to (repeatable)")
    args = p.parse_args(argv)
    for b in args.bundle:
        try:
            doc = add_to_bundle(b)
        except (CacheError, OSError, KeyError, ValueError) as e:
            sys.exit(f"cache: {b}: {e}")
        print(f"{b}: wrote {CACHED_FILE} and {CACHE_FILE}; parity {doc['parity']['max_abs_diff']}")
