"""Tests of model.py and export.py: official key layout, checkpoint loading, ONNX parity, CLI.

    python -m pytest -q export/tests/test_export.py
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.export import (
    DECODER_INPUT, ENCODER_INPUT, TRANSFORMER_INPUT, ExportError, check_parity, config_from_hparams,
    hparams_of, load_official, random_init, write_bundle,
)
from export.model import (
    PRESETS, AttnBlock, Autoencoder, Downsample, ResBlock, Transformer, Upsample,
)

ROOT = Path(__file__).resolve().parents[2]
DIGITS_SHAPE = Path(__file__).with_name("digits_shape.json")
# Smaller than digits, but with two attention resolutions, two res blocks per level, and
# a channel change in the decoder's first level.
TINY = {
    "img_size": 16, "n_channels": 3, "nf": 8, "ch_mult": [1, 2], "res_blocks": 2,
    "attn_resolutions": [16, 8], "codebook_size": 32, "emb_dim": 8, "latent_shape": [1, 8, 8],
    "bert_n_emb": 32, "bert_n_head": 2, "bert_n_layers": 1, "block_size": 64, "norm_groups": 4,
}

torch.set_num_threads(1)


# --- official layout (spec 2.2-2.6, 3), on the meta device: no memory ------------------------


def churches_meta():
    vq, pc = PRESETS["churches"]
    with torch.device("meta"):
        return Autoencoder(vq, logsigma=True), Transformer(pc)


def test_churches_parameter_counts_match_the_spec():
    ae, prior = churches_meta()
    sd = ae.state_dict()

    def count(prefix):
        return sum(v.numel() for k, v in sd.items() if k.startswith(prefix))

    assert count("encoder.") == 30_349_568
    assert count("quantize.") == 262_144
    assert count("generator.blocks.") == 35_020_291
    assert count("generator.logsigma.") == 147_971
    assert sum(p.numel() for p in prior.parameters()) == 76_838_912


def test_churches_key_counts_match_the_spec():
    ae, prior = churches_meta()
    sd = ae.state_dict()
    assert sum(k.startswith("encoder.") for k in sd) == 164
    assert sum(k.startswith("generator.") for k in sd) == 168  # incl. the 4 logsigma tensors
    assert len(prior.state_dict()) + 3 == 393  # + Lt_history, Lt_count, loss_history


def test_churches_block_layout_and_shapes_match_the_spec():
    ae, prior = churches_meta()
    enc, gen = ae.encoder.blocks, ae.generator.blocks
    assert len(enc) == len(gen) == 22
    assert [i for i, b in enumerate(enc) if isinstance(b, Downsample)] == [3, 6, 9, 12]
    assert [i for i, b in enumerate(enc) if isinstance(b, AttnBlock)] == [14, 16, 18]
    assert [i for i, b in enumerate(gen) if isinstance(b, AttnBlock)] == [2, 5, 7]
    assert [i for i, b in enumerate(gen) if isinstance(b, Upsample)] == [8, 11, 14, 17]
    assert isinstance(enc[7], ResBlock) and isinstance(gen[15], ResBlock)
    shapes = {k: list(v.shape) for k, v in ae.state_dict().items()}
    expected = {
        "encoder.blocks.0.weight": [128, 3, 3, 3],
        "encoder.blocks.3.conv.weight": [128, 128, 3, 3],
        "encoder.blocks.7.conv1.weight": [256, 128, 3, 3],
        "encoder.blocks.7.conv_out.weight": [256, 128, 1, 1],
        "encoder.blocks.8.conv_out.weight": [256, 256, 1, 1],  # exists though unused
        "encoder.blocks.12.conv.weight": [256, 256, 3, 3],
        "encoder.blocks.13.conv_out.weight": [512, 256, 1, 1],
        "encoder.blocks.14.q.weight": [512, 512, 1, 1],
        "encoder.blocks.18.proj_out.bias": [512],
        "encoder.blocks.20.weight": [512],
        "encoder.blocks.21.weight": [256, 512, 3, 3],
        "encoder.blocks.21.bias": [256],
        "quantize.embedding.weight": [1024, 256],
        "generator.blocks.0.weight": [512, 256, 3, 3],
        "generator.blocks.8.conv.weight": [512, 512, 3, 3],
        "generator.blocks.9.conv1.weight": [256, 512, 3, 3],
        "generator.blocks.9.conv_out.weight": [256, 512, 1, 1],
        "generator.blocks.15.conv_out.weight": [128, 256, 1, 1],
        "generator.blocks.17.conv.weight": [128, 128, 3, 3],
        "generator.blocks.20.bias": [128],
        "generator.blocks.21.weight": [3, 128, 3, 3],
        "generator.logsigma.0.weight": [128, 128, 3, 3],
        "generator.logsigma.2.weight": [3, 128, 1, 1],
        "generator.logsigma.2.bias": [3],
    }
    assert {k: shapes.get(k) for k in expected} == expected
    tshapes = {k: list(v.shape) for k, v in prior.state_dict().items()}
    texpected = {
        "pos_emb": [1, 256, 512], "start_tok": [1, 1, 512], "tok_emb.weight": [1025, 512],
        "blocks.23.ln1.weight": [512], "blocks.23.ln2.bias": [512],
        "blocks.0.attn.key.weight": [512, 512], "blocks.0.attn.query.bias": [512],
        "blocks.0.attn.value.weight": [512, 512], "blocks.0.attn.proj.bias": [512],
        "blocks.0.mlp.0.weight": [2048, 512], "blocks.0.mlp.0.bias": [2048],
        "blocks.0.mlp.2.weight": [512, 2048], "blocks.0.mlp.2.bias": [512],
        "ln_f.weight": [512], "head.weight": [1024, 512],
    }
    assert {k: tshapes.get(k) for k in texpected} == texpected
    assert "head.bias" not in tshapes


# --- hparams ---------------------------------------------------------------------------------


def test_hparams_round_trip():
    vq, pc = config_from_hparams(TINY)
    assert hparams_of(vq, pc) == TINY
    vq, pc = config_from_hparams({**TINY, "background_code": True})
    assert vq.background_code and hparams_of(vq, pc) == {**TINY, "background_code": True}
    with pytest.raises(ExportError, match="background_code must be true or false"):
        config_from_hparams({**TINY, "background_code": 1})


@pytest.mark.parametrize("change, key", [
    ({"n_channel": 3}, "did you mean .n_channels."),
    ({"latent_shape": [1, 4, 4]}, "latent_shape"),
    ({"block_size": 32}, "block_size"),
    ({"norm_groups": 3}, "norm_groups"),
    ({"bert_n_head": 3}, "bert_n_head"),
    ({"nf": 0}, "nf"),
    ({"ch_mult": 2}, "ch_mult"),
])
def test_bad_hparams_are_rejected_naming_the_key(change, key):
    with pytest.raises(ExportError, match=key):
        config_from_hparams({**TINY, **change})


def test_missing_hparams_key_is_named():
    hp = {k: v for k, v in TINY.items() if k != "emb_dim"}
    with pytest.raises(ExportError, match="emb_dim"):
        config_from_hparams(hp)


# --- official checkpoint loading (synthetic files in the official layout) --------------------


def write_official(tmp_path, vq, pc, seed=1, vq_edit=None, prior_edit=None):
    """Save a VQGAN-style and an AbsorbingDiffusion-style state dict as the official code would."""
    ae, prior = random_init(vq, pc, seed)
    ae_sd = {"ae." + k: v for k, v in Autoencoder(vq, logsigma=True).state_dict().items()}
    ae_sd.update({"ae." + k: v for k, v in ae.state_dict().items()})
    ae_sd["disc.main.0.weight"] = torch.zeros(4, 3, 4, 4)
    ae_sd["disc.main.3.running_mean"] = torch.zeros(4)
    ae_sd["perceptual.lin0.model.1.weight"] = torch.zeros(1, 4, 1, 1)
    prior_sd = {"_denoise_fn." + k: v for k, v in prior.state_dict().items()}
    # training statistics; 1001 long if trained before commit 401229e (spec 9)
    prior_sd.update({k: torch.zeros(1001) for k in ("Lt_history", "Lt_count", "loss_history")})
    for sd, edit in ((ae_sd, vq_edit), (prior_sd, prior_edit)):
        if edit:
            edit(sd)
    torch.save(ae_sd, tmp_path / "vqgan_ema_10.th")
    torch.save(prior_sd, tmp_path / "absorbing_ema_10.th")
    return ae, prior, tmp_path / "vqgan_ema_10.th", tmp_path / "absorbing_ema_10.th"


def test_official_checkpoints_load_and_ignore_training_keys(tmp_path):
    vq, pc = config_from_hparams(TINY)
    ae, prior, fv, fp = write_official(tmp_path, vq, pc)
    ae2, prior2 = load_official(fv, fp, vq, pc)
    for a, b in ((ae, ae2), (prior, prior2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("which, edit, needles", [
    ("vqgan", lambda sd: sd.pop("ae.encoder.blocks.3.conv1.weight"),
     ["missing key 'ae.encoder.blocks.3.conv1.weight'", "[8, 8, 3, 3]", "--preset"]),
    ("vqgan", lambda sd: sd.update({"ae.quantize.embedding.weight": torch.zeros(64, 8)}),
     ["'ae.quantize.embedding.weight'", "[64, 8]", "[32, 8]"]),
    ("vqgan", lambda sd: sd.update({"ae.post_quant_conv.weight": torch.zeros(1)}),
     ["unexpected", "ae.post_quant_conv.weight"]),
    ("prior", lambda sd: sd.update({"_denoise_fn.tok_emb.weight": torch.zeros(32, 32)}),
     ["'_denoise_fn.tok_emb.weight'", "[32, 32]", "[33, 32]"]),
    ("prior", lambda sd: sd.pop("_denoise_fn.blocks.0.attn.proj.bias"),
     ["missing key '_denoise_fn.blocks.0.attn.proj.bias'"]),
    ("prior", lambda sd: sd.update({"mask": torch.zeros(1)}), ["unexpected", "'mask'"]),
])
def test_bad_checkpoints_fail_naming_the_key(tmp_path, which, edit, needles):
    vq, pc = config_from_hparams(TINY)
    edits = {"vq_edit": edit} if which == "vqgan" else {"prior_edit": edit}
    _, _, fv, fp = write_official(tmp_path, vq, pc, **edits)
    with pytest.raises(ExportError) as err:
        load_official(fv, fp, vq, pc)
    for needle in needles:
        assert needle in str(err.value)


# --- ONNX export and parity ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    vq, pc = config_from_hparams(TINY)
    ae, prior = random_init(vq, pc, seed=3)
    out = write_bundle(ae, prior, vq, pc, tmp_path_factory.mktemp("tiny"), name="tiny", steps=8,
                       temperature=0.9, source="test", metrics={"note": 1})
    return out, ae, prior, vq, pc


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def test_parity_report_is_in_model_json(tiny_bundle):
    out, *_ = tiny_bundle
    m = json.loads((out / "model.json").read_text())
    parity = m["provenance"]["metrics"]["parity"]
    assert m["provenance"]["metrics"]["note"] == 1
    assert parity["encoder"]["token_mismatches"] == 0
    assert 0 <= parity["decoder"]["max_abs_diff"] <= 1e-4
    assert 0 <= parity["transformer"]["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("batch", [1, 3])
def test_graphs_match_torch(tiny_bundle, batch):
    out, ae, prior, vq, pc = tiny_bundle
    g = torch.Generator().manual_seed(100 + batch)
    image = torch.rand(batch, 3, 16, 16, generator=g)
    tokens = torch.randint(0, 32, (batch, 8, 8), generator=g)
    seq = torch.randint(0, 33, (batch, 64), generator=g)
    seq[:, ::3] = pc.mask_id
    with torch.no_grad():
        want_tokens = ae.quantize_tokens(ae.encode(image)).numpy()
        want_image = ae.decode_tokens(tokens).numpy()
        want_logits = prior(seq).numpy()
    got_tokens = session(out / "encoder.onnx").run(None, {ENCODER_INPUT: image.numpy()})[0]
    got_image = session(out / "decoder.onnx").run(None, {DECODER_INPUT: tokens.numpy()})[0]
    got_logits = session(out / "transformer.onnx").run(None, {TRANSFORMER_INPUT: seq.numpy()})[0]
    assert got_tokens.dtype == np.int64 and got_tokens.shape == (batch, 8, 8)
    np.testing.assert_array_equal(got_tokens, want_tokens)
    assert got_image.shape == (batch, 3, 16, 16)
    np.testing.assert_allclose(got_image, want_image, rtol=0, atol=1e-4)
    assert got_logits.shape == (batch, 64, 32)
    np.testing.assert_allclose(got_logits, want_logits, rtol=0, atol=1e-4)


def test_decoder_takes_a_non_square_grid(tiny_bundle):
    out, ae, *_ = tiny_bundle
    tokens = torch.randint(0, 32, (2, 5, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = ae.decode_tokens(tokens).numpy()
    got = session(out / "decoder.onnx").run(None, {DECODER_INPUT: tokens.numpy()})[0]
    assert got.shape == (2, 3, 10, 24)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_parity_check_fails_on_a_model_unlike_the_graph(tiny_bundle):
    out, ae, prior, vq, pc = tiny_bundle
    bias = ae.generator.blocks[-1].bias
    with torch.no_grad():
        bias += 0.01
    try:
        with pytest.raises(ExportError, match="graph 'decoder' max abs diff"):
            check_parity(out, ae, prior, vq, pc)
    finally:
        with torch.no_grad():
            bias -= 0.01


def test_a_class_conditional_transformer_exports_a_class_input_that_changes_its_logits(tmp_path):
    vq, pc = config_from_hparams({**TINY, "n_classes": 3})
    assert pc.n_classes == 3 and hparams_of(vq, pc)["n_classes"] == 3
    ae, prior = random_init(vq, pc, seed=4)
    with torch.no_grad():  # random init puts all classes near 0: make them tell apart
        prior.class_emb.weight.normal_(0, 1, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ExportError, match="needs their 3 names"):
        write_bundle(ae, prior, vq, pc, tmp_path / "x", name="c", steps=8, temperature=1.0, source="test")
    out = write_bundle(ae, prior, vq, pc, tmp_path / "c", name="c", steps=8, temperature=1.0, source="test",
                       classes=["a", "b", "c"], guidance=2.5)
    m = json.loads((out / "model.json").read_text())
    assert m["classes"] == ["a", "b", "c"] and m["provenance"]["hparams"]["n_classes"] == 3
    assert m["sampling"]["guidance"] == 2.5
    s = session(out / "transformer.onnx")
    assert [(i.name, i.shape) for i in s.get_inputs()] == [(TRANSFORMER_INPUT, ["batch", 64]), ("class", ["batch"])]
    seq = np.full((4, 64), pc.mask_id, np.int64)
    seq[:, ::2] = 5
    classes = np.array([-1, 0, 1, 2], np.int64)
    got = s.run(None, {TRANSFORMER_INPUT: seq, "class": classes})[0]
    with torch.no_grad():
        want = prior(torch.from_numpy(seq), torch.from_numpy(classes)).numpy()
        none = prior(torch.from_numpy(seq[:1])).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got[:1], none, rtol=0, atol=1e-4)  # -1 = no class = no class given
    for i in range(4):  # every class (and none) gives other logits
        for j in range(i):
            assert np.abs(got[i] - got[j]).max() > 1e-2, (i, j)
    # An unconditional graph takes no class; the feed helper says so instead of onnxruntime's error.
    from export.feed import transformer_feed
    with pytest.raises(ExportError, match="guidance 2"):
        write_bundle(ae, random_init(*config_from_hparams(TINY), seed=4)[1], vq, config_from_hparams(TINY)[1],
                     tmp_path / "g", name="g", steps=8, temperature=1.0, source="test", guidance=2)
    plain = write_bundle(ae, random_init(*config_from_hparams(TINY), seed=4)[1], vq,
                         config_from_hparams(TINY)[1], tmp_path / "p", name="p", steps=8, temperature=1.0,
                         source="test")
    with pytest.raises(ValueError, match="no class input"):
        transformer_feed(session(plain / "transformer.onnx"), seq, classes)


# --- CLI end to end --------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "export", "official", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cli_random_init_writes_a_contract_bundle(tmp_path):
    out = tmp_path / "bundle"
    r = run_cli("--random-init", "--seed", 5, "--hparams", DIGITS_SHAPE, "--out", out,
                "--steps", 16, "--name", "rand-digits")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "model.json").read_text())
    assert list(m) == ["format", "name", "image", "tokens", "graphs", "sampling", "provenance"]
    assert m["format"] == "absorb-bundle/1" and m["name"] == "rand-digits"
    assert m["image"] == {"channels": 1, "height": 32, "width": 32, "range": [0.0, 1.0]}
    assert m["tokens"] == {"height": 8, "width": 8, "codebook_size": 64, "mask_id": 64}
    assert m["sampling"] == {"steps": 16, "temperature": 1.0}
    assert set(m["graphs"]) == {"encoder", "decoder", "transformer"}
    for g, entry in m["graphs"].items():
        assert set(entry) == {"file", "sha256"} and entry["file"] == f"{g}.onnx"
        assert entry["sha256"] == hashlib.sha256((out / entry["file"]).read_bytes()).hexdigest()
    prov = m["provenance"]
    assert {"exporter", "opset", "source", "metrics"} <= set(prov)
    assert prov["opset"] == 17 and prov["exporter"].startswith("absorb export ")
    assert sorted(p.name for p in out.iterdir()) == [
        "cache.json", "decoder.onnx", "encoder.onnx", "model.json", "transformer.cached.onnx", "transformer.onnx"]


def test_cli_bad_checkpoint_exits_non_zero_naming_the_key(tmp_path):
    vq, pc = config_from_hparams(json.loads(DIGITS_SHAPE.read_text()))
    drop = lambda sd: sd.pop("ae.generator.blocks.0.bias")  # noqa: E731
    _, _, fv, fp = write_official(tmp_path, vq, pc, vq_edit=drop)
    r = run_cli("--vqgan", fv, "--prior", fp, "--hparams", DIGITS_SHAPE, "--out", tmp_path / "b")
    assert r.returncode == 1
    assert "missing key 'ae.generator.blocks.0.bias'" in r.stderr
    assert not (tmp_path / "b" / "model.json").exists()


def test_cli_refuses_a_class_conditional_shape_it_cannot_fill(tmp_path):
    hp = tmp_path / "c.json"
    hp.write_text(json.dumps({**json.loads(DIGITS_SHAPE.read_text()), "n_classes": 10}))
    r = run_cli("--random-init", "--hparams", hp, "--out", tmp_path / "b")
    assert r.returncode == 1 and "n_classes 10" in r.stderr and "train-digits" in r.stderr, r.stderr
    assert not (tmp_path / "b" / "model.json").exists()


def test_cli_rejects_mixed_sources(tmp_path):
    r = run_cli("--random-init", "--vqgan", tmp_path / "x.th", "--preset", "churches",
                "--out", tmp_path)
    assert r.returncode == 2 and "--random-init" in r.stderr


# --- a full dump of the official hyperparameters ---------------------------------------------

FULL_DUMP = Path(__file__).with_name("digits_full_hparams.json")


def test_a_full_official_dump_reads_the_architecture_and_lists_the_rest(capsys):
    hp = json.loads(FULL_DUMP.read_text())
    assert config_from_hparams(hp) == config_from_hparams(json.loads(DIGITS_SHAPE.read_text()))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ignoring 44 keys" in err and "ema_beta" in err, err
    assert "sampler" not in err.split(":", 2)[-1].split(", ")


@pytest.mark.parametrize("change, words", [
    ({"sampler": "autoregressive"}, "only the absorbing sampler"),
    ({"quantizer": "gumbel"}, "nearest-code quantizer"),
    ({"bert_n_emd": 128}, "did you mean 'bert_n_emb'"),
])
def test_a_dump_for_another_model_or_with_a_typo_is_refused(change, words):
    with pytest.raises(ExportError, match=words):
        config_from_hparams({**json.loads(FULL_DUMP.read_text()), **change})


def test_cli_exports_a_full_official_dump_that_passes_its_parity_check(tmp_path):
    out = tmp_path / "bundle"
    r = run_cli("--random-init", "--hparams", FULL_DUMP, "--out", out, "--steps", 16)
    assert r.returncode == 0, r.stderr
    assert "ignoring 44 keys inference does not use" in r.stderr
    m = json.loads((out / "model.json").read_text())
    assert m["provenance"]["hparams"] == json.loads(DIGITS_SHAPE.read_text())
    assert set(m["provenance"]["metrics"]["parity"]) == {"encoder", "decoder", "transformer"}
