"""The cached-attention graph (cache.py) against the PyTorch module: a cheap pass with a freshly
computed cache equals the full pass at its positions; every bundle the exporter writes has it; an
existing bundle gets it without its model.json changing."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export import cache as Cache
from export.export import config_from_hparams, random_init, write_bundle
from export.model import PriorConfig, Transformer

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "img_size": 16, "n_channels": 3, "nf": 8, "ch_mult": [1, 2], "res_blocks": 1,
    "attn_resolutions": [8], "codebook_size": 32, "emb_dim": 8, "latent_shape": [1, 8, 8],
    "bert_n_emb": 32, "bert_n_head": 2, "bert_n_layers": 2, "block_size": 64, "norm_groups": 4,
}

torch.set_num_threads(1)


def trained_like(pc: PriorConfig, seed: int = 0) -> Transformer:
    """A module with weights of a trained model's scale (the init's 0.02 makes attention flat, which
    would hide an attention bug)."""
    torch.manual_seed(seed)
    prior = Transformer(pc)
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_(0, 0.3)
    return prior.eval()


@pytest.mark.parametrize("n_classes, attn_bias", [(0, False), (5, False), (5, True)])
def test_a_cheap_pass_on_a_fresh_cache_equals_the_full_pass(tmp_path, n_classes, attn_bias):
    pc = PriorConfig(codebook_size=16, bert_n_emb=32, bert_n_head=4, bert_n_layers=3,
                     block_size=25 if attn_bias else 24, n_classes=n_classes, attn_bias=attn_bias)
    prior = trained_like(pc)
    report = Cache.export_cached(prior, tmp_path)
    assert report["max_abs_diff"]["partial"] <= Cache.PARITY_ATOL
    s = Cache.session(tmp_path / Cache.CACHED_FILE)
    names = [i.name for i in s.get_inputs()]
    assert names == ["tokens", "positions"] + (["class"] if n_classes else []) + ["keys", "values"]
    # By hand: the full pass, then a cheap pass at 5 positions after 3 of them changed token. The
    # changed positions see themselves as they are now; everything else is the cache's.
    L, K, N, D = pc.block_size, 16, 3, 32
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, K + 1, (1, L), generator=g)
    cls = np.array([min(1, n_classes - 1)] if n_classes else [], np.int64) if n_classes else None
    all_pos = np.arange(L)[None]
    zeros = np.zeros((N, 1, L, D), np.float32)
    logits, keys, values = s.run(None, Cache.feed(x.numpy(), all_pos, zeros, zeros, cls))
    with torch.no_grad():
        want = prior(x, None if cls is None else torch.from_numpy(cls)).numpy()
    assert np.abs(logits - want).max() <= 1e-4, "a pass over every position is the full pass"
    pos = np.array([[2, 7, 11, 19, 23]])
    y = x.clone()
    y[0, [2, 7, 11]] = torch.tensor([1, 2, 3])
    cheap, _, _ = s.run(None, Cache.feed(y.numpy()[:, pos[0]], pos, keys, values, cls))
    with torch.no_grad():
        exact = prior(y, None if cls is None else torch.from_numpy(cls)).numpy()[:, pos[0]]
        stale = Cache.Partial(prior)(y[:, pos[0]], torch.from_numpy(pos), torch.from_numpy(keys),
                                     torch.from_numpy(values), None if cls is None else torch.from_numpy(cls))
    assert np.abs(cheap - stale[0].numpy()).max() <= 1e-4, "the graph is the module"
    # ... and an approximation of the exact pass: close, not equal (the others' keys are stale)
    assert 0 < np.abs(cheap - exact).max() < np.abs(exact).max()


def test_every_bundle_the_exporter_writes_has_the_cached_graph_and_old_ones_get_it_unchanged(tmp_path):
    vq, pc = config_from_hparams(TINY)
    # untrained: its LayerNorm weights are all equal, which the exporter folds into one initializer
    ae, prior = random_init(vq, pc, seed=0)
    out = tmp_path / "b"
    write_bundle(ae, prior, vq, pc, out, name="tiny", steps=4, temperature=1.0, source="test")
    doc = json.loads((out / Cache.CACHE_FILE).read_text())
    assert doc["format"] == Cache.FORMAT and doc["file"] == Cache.CACHED_FILE
    assert doc["sha256"] == hashlib.sha256((out / Cache.CACHED_FILE).read_bytes()).hexdigest()
    assert doc["transformer_sha256"] == hashlib.sha256((out / "transformer.onnx").read_bytes()).hexdigest()
    assert doc["layers"] == pc.bert_n_layers and doc["width"] == pc.bert_n_emb
    # The torch module rebuilt from transformer.onnx is the one that was exported.
    rebuilt = Cache.prior_from_onnx(out / "transformer.onnx", pc)
    want = prior.state_dict()
    assert all(torch.equal(rebuilt.state_dict()[k], want[k]) for k in want if k != "start_tok")
    # An existing bundle (the shipped digits): the graph and cache.json added, model.json untouched.
    digits = tmp_path / "digits"
    shutil.copytree(ROOT / "models" / "digits", digits)
    for f in (Cache.CACHED_FILE, Cache.CACHE_FILE):
        (digits / f).unlink(missing_ok=True)
    before = (digits / "model.json").read_bytes()
    Cache.main(["--bundle", str(digits)])
    assert (digits / "model.json").read_bytes() == before
    assert json.loads((digits / Cache.CACHE_FILE).read_text())["parity"]["max_abs_diff"]["partial"] <= 1e-4


def test_a_graph_that_is_not_the_module_is_refused(tmp_path):
    pc = PriorConfig(codebook_size=16, bert_n_emb=32, bert_n_head=4, bert_n_layers=2, block_size=24)
    prior = trained_like(pc)
    Cache.export_cached(prior, tmp_path)
    with torch.no_grad():
        prior.blocks[1].attn.value.weight.mul_(1.5)  # the module moved on; the graph did not
    with pytest.raises(Cache.CacheError, match="differs from the module"):
        Cache.check_parity(prior, tmp_path)


def test_the_distance_bias_favours_near_positions_and_its_hparam_round_trips(tmp_path):
    pc = PriorConfig(codebook_size=16, bert_n_emb=32, bert_n_head=4, bert_n_layers=1, block_size=25, attn_bias=True)
    a = Transformer(pc).blocks[0].attn
    b = a.bias(torch.arange(25))  # (heads, 25, 25) on a 5 x 5 grid
    assert b.shape == (4, 25, 25) and torch.all(b[:, 12, 12] == 0)
    assert torch.all(b[:, 12, 13] == b[:, 12, 7]), "left/right and up/down neighbours are as near"
    assert torch.all(b[:, 12, 13] > b[:, 12, 14]) and torch.all(b[:, 12, 14] > b[:, 12, 0])
    assert torch.all(b[0] <= b[1]) and b[0, 12, 13] < b[1, 12, 13], "the first head is the most local"
    with pytest.raises(ValueError, match="square token grid; block_size is 24"):
        Transformer(PriorConfig(codebook_size=16, bert_n_emb=32, bert_n_head=4, bert_n_layers=1, block_size=24,
                                attn_bias=True))
    hp = {**TINY, "attn_bias": True}
    vq, pc2 = config_from_hparams(hp)
    assert pc2.attn_bias
    assert not config_from_hparams(TINY)[1].attn_bias
    with pytest.raises(Exception, match="attn_bias must be true or false"):
        config_from_hparams({**TINY, "attn_bias": 1})
