"""The emoji trainer: checkpoints inside a stage resume to the same bytes as a run that never
stopped, a checkpoint of other settings is refused by name, and the judge exports to onnxruntime."""

import dataclasses

import numpy as np
import pytest
import torch

from export import emoji_train as ET
from export import train as T


class StopAt(T.Progress):
    """A Progress that is asked to stop (as SIGTERM would) once a stage reaches iteration `at`."""

    def __init__(self, *a, at: int, **k):
        super().__init__(*a, **k)
        self.at = at

    def step(self, stage, it, state):
        self.stop_asked = it >= self.at
        super().step(stage, it, state)


def cfg():
    return ET.EmojiConfig(**{**ET.QUICK, "ae_iters": 7, "denoise_iters": 5, "prior_iters": 9})


def tiny_data(n=24):
    g = torch.Generator().manual_seed(5)
    return torch.rand(n, 3, 64, 64, generator=g), torch.randint(0, cfg().n_classes, (n,), generator=g)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("stage, at", [("autoencoder", 3), ("decoder", 2), ("prior", 4)])
def test_a_run_stopped_inside_a_stage_resumes_to_the_same_bytes(tmp_path, stage, at):
    c = cfg()
    x, y = tiny_data()
    settings = ET.stage_settings(c)
    whole = T.Progress(tmp_path / "whole.pt", settings, every=2)
    ae0, prior0, _, _ = ET.train_stages(c, x, y, x[:8], y[:8], whole, T.CPU)

    path = tmp_path / "stopped.pt"
    stopper = StopAt(path, settings, every=2, at=at)
    # only the chosen stage stops: the others run through
    real_step = stopper.step
    stopper.step = lambda s, it, st: real_step(s, it, st) if s == stage else T.Progress.step(stopper, s, it, st)
    with pytest.raises(T.Paused, match=f"stage {stage} after iteration {at}"):
        ET.train_stages(c, x, y, x[:8], y[:8], stopper, T.CPU)
    again = T.Progress(path, settings, every=2, resume=True)
    assert again.current(stage)["it"] == at
    ae1, prior1, _, _ = ET.train_stages(c, x, y, x[:8], y[:8], again, T.CPU)
    assert same_weights(ae0, ae1), "the autoencoder differs after resuming"
    assert same_weights(prior0, prior1), "the prior differs after resuming"


def test_resuming_with_other_settings_or_a_broken_file_is_refused_by_name(tmp_path):
    c = cfg()
    path = tmp_path / "ck.pt"
    T.Progress(path, ET.stage_settings(c)).finish("autoencoder", {"ae": {}})
    other = dataclasses.replace(c, codebook_size=64)
    with pytest.raises(ValueError, match="other settings \\(codebook_size\\)"):
        T.Progress(path, ET.stage_settings(other), resume=True)
    # sampling defaults are not settings of the stages
    assert T.Progress(path, ET.stage_settings(dataclasses.replace(c, steps=3)), resume=True).done("autoencoder")
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read .*ck.pt"):
        T.Progress(path, ET.stage_settings(c), resume=True)


def test_other_later_settings_keep_the_autoencoder_and_equal_a_whole_run(tmp_path):
    """codebook_merge and the prior's settings are later stages': resuming with other values keeps
    the autoencoder stage and trains the rest again, to the bytes of a whole run with them."""
    c, x, y = cfg(), *tiny_data()
    other = dataclasses.replace(c, codebook_merge=8, prior_iters=5)
    whole = T.Progress(tmp_path / "whole.pt", ET.stage_settings(other), every=2)
    ae0, prior0, _, _ = ET.train_stages(other, x, y, x[:8], y[:8], whole, T.CPU)

    path = tmp_path / "ck.pt"
    ET.train_stages(c, x, y, x[:8], y[:8], T.Progress(path, ET.stage_settings(c), every=2), T.CPU)
    again = T.Progress(path, ET.stage_settings(other), every=2, resume=True, later=ET.LATER_SETTINGS)
    assert again.done("autoencoder") and not again.done("decoder") and not again.done("prior")
    ae1, prior1, _, _ = ET.train_stages(other, x, y, x[:8], y[:8], again, T.CPU)
    assert ae1.quantize.embedding.num_embeddings == 8
    assert same_weights(ae0, ae1) and same_weights(prior0, prior1), "not the bytes of a whole run"
    # a checkpoint from before codebook_merge and attn_bias existed (v3's) reads them as off
    saved = torch.load(path, weights_only=False)
    for k in ("codebook_merge", "attn_bias"):
        del saved["config"][k]
    torch.save(saved, path)
    old = dataclasses.replace(other, codebook_merge=0, attn_bias=False)
    assert T.Progress(path, ET.stage_settings(old), resume=True).done("autoencoder")
    # an autoencoder setting is still refused, named
    with pytest.raises(ValueError, match="other settings \\(nf\\)"):
        T.Progress(path, ET.stage_settings(dataclasses.replace(other, nf=4)), resume=True, later=ET.LATER_SETTINGS)


def test_the_judge_exports_with_logits_and_features(tmp_path):
    from export.classifier import session

    c = cfg()
    judge = ET.EmojiJudge(c.n_classes)
    ET.export_judge(judge, tmp_path / "classifier.onnx")
    s = session(tmp_path / "classifier.onnx")
    logits, feats = s.run(None, {"image": np.zeros((3, 3, 64, 64), np.float32)})
    assert logits.shape == (3, c.n_classes + 1) and feats.shape == (3, 128)


def test_white_shift_fills_with_white():
    x = torch.zeros(4, 3, 64, 64)
    shifted = ET.white_shift(x, 3, torch.Generator().manual_seed(0))
    assert shifted.min() == 0 and shifted.max() == 1, "some image moved: white came in at an edge"
    assert torch.equal(ET.white_shift(x, 0, torch.Generator()), x)
