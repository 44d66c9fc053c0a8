"""`python -m export train` end to end (--quick, on a folder made here), its refusals, and the
measures of judge.py; plus the committed scenes bundle against its stated numbers."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export import images, judge
from export.classifier import session

ROOT = Path(__file__).resolve().parents[2]
ABSORB = Path(os.environ.get("ABSORB_BIN", ROOT / "target" / "release" / "absorb"))
SCENES = ROOT / "models" / "scenes"


def texture(h, w, seed, colour=True):
    """A smooth random field: stationary, in colour or grey. uint8 (h, w[, 3])"""
    rng = np.random.default_rng(seed)
    small = rng.random((h // 8 + 1, w // 8 + 1, 3 if colour else 1))
    big = np.asarray(Image.fromarray((small * 255).astype(np.uint8).squeeze()).resize((w, h), Image.BILINEAR))
    return big


def folder(tmp_path, specs):
    d = tmp_path / "imgs"
    d.mkdir()
    for name, (h, w, colour) in specs.items():
        Image.fromarray(texture(h, w, len(name), colour)).save(d / name)
    return d


@pytest.mark.skipif(not ABSORB.is_file(), reason=f"{ABSORB} is not built (make build)")
def test_quick_run_on_crops_writes_a_bundle_the_runtime_measures(tmp_path):
    src = folder(tmp_path, {"a.png": (72, 96, True), "b.jpg": (64, 120, False)})
    out = tmp_path / "mine"
    images.main(["--images", str(src), "--out", str(out), "--quick", "--absorb", str(ABSORB), "--threads", "1"])
    m = json.loads((out / "model.json").read_text())
    assert m["name"] == "mine" and m["image"]["channels"] == 3  # one colour image makes a colour bundle
    assert m["tokens"]["height"] == m["tokens"]["width"] == 8
    held = sorted((out / "eval" / "heldout").glob("*.png"))
    assert len(held) == 32 and {p.stem.split("_")[1] for p in held} == {"a", "b"}
    q = json.loads((out / "eval" / "quality.json").read_text())
    assert q["mode"] == "crops" and q["sources"] == ["a.png", "b.jpg"]
    assert {r["sampler"] for r in q["table"]} == set(judge.SAMPLERS)
    assert all(sum(r["source_histogram"]) <= r["count"] for r in q["table"])
    assert q["seams"]["ratio"] > 0 and q["outpaint"]["count"] == 4
    assert m["sampling"]["window_stride"] == [q["seams"]["stride"]] * 2  # the measured choice is shipped
    assert m["sampling"].get("sampler") == q["samples"]["sampler"] and len(q["selection"]) == 2
    # the outpaint edge chosen among 0, 1 and 2 by the continuation measure is shipped
    assert [r["edge"] for r in q["outpaint_edge"]["candidates"]] == [0, 1, 2]
    assert m["sampling"].get("outpaint_edge", 0) == q["outpaint_edge"]["edge"]
    ct = q["outpaint"]["continuation"]
    assert ct["count"] == 8 and 0 <= ct["same_source"] <= 1
    logits, feats = session(out / "eval" / "judge.onnx").run(None, {"image": np.zeros((2, 3, 32, 32), np.float32)})
    assert logits.shape == (2, 3) and feats.shape == (2, 64)  # two sources + fake
    assert (out / "samples.png").exists() and "KID" in (out / "README.md").read_text()


def test_whole_mode_holds_out_files_and_keeps_windows_apart():
    arrays = [np.zeros((1, 16, 16), np.float32) + i / 10 for i in range(10)]
    data = images.split([f"{i}.png" for i in range(10)], arrays, 16, 0.2, "auto")
    assert data.mode == "whole" and len(data.held[0]) == 2 and len(data.train[0]) == 8
    held = {float(x[0, 0, 0]) for x in data.held[0]}
    assert held.isdisjoint({float(x[0, 0, 0]) for x in data.train[0]})
    assert judge.default_tiles("whole", 4) == {"window_stride": (4, 4), "window_margin": (0, 0)}


def test_crops_never_come_from_the_held_out_columns():
    a = np.tile(np.arange(100, dtype=np.float32)[None, None] / 100, (1, 40, 1))  # pixel value = column / 100
    data = images.split(["a.png"], [a], 16, 0.2, "crops")
    x, _ = images.fixed_set(data, "train", 200, 16, 0)
    assert float(x.max()) < 0.80  # columns 80.. are held out
    x, _ = images.fixed_set(data, "held", 50, 16, 0)
    assert float(x.min()) >= 0.80


@pytest.mark.parametrize("specs, flags, message", [
    ({}, [], "holds no"),
    ({"a.png": (20, 64, True)}, [], "smaller than --size 32"),
    ({"a.png": (40, 40, True)}, [], "too narrow"),
    ({"a.png": (32, 32, True), "b.png": (40, 40, True)}, ["--mode", "whole"], "needs every image 32x32"),
    ({"a.png": (64, 64, True)}, ["--size", "30"], "multiple of 4"),
    ({"a.png": (64, 64, True)}, ["--set", "nope=1"], "no setting 'nope'"),
    ({"a.png": (64, 64, True)}, ["--device", "tpu"], "--device tpu"),
])
def test_bad_folders_and_flags_are_refused_naming_the_problem(tmp_path, capsys, specs, flags, message):
    src = folder(tmp_path, specs)
    with pytest.raises(SystemExit) as e:
        images.main(["--images", str(src), "--out", str(tmp_path / "o"), "--absorb", sys.executable, *flags])
    assert message in str(e.value)
    assert not (tmp_path / "o").exists()


def test_an_unreadable_file_is_named(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(SystemExit) as e:
        images.main(["--images", str(d), "--out", str(tmp_path / "o"), "--absorb", "/bin/true"])
    assert "broken.png" in str(e.value)


def test_kid_is_near_zero_for_one_distribution_and_large_for_two():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 64)), rng.normal(size=(300, 64))
    assert abs(judge.kid_x1000(a, b)) < 5
    assert judge.kid_x1000(a, b + 0.5) > 50


def test_seam_ratio_sees_a_step_at_window_edges_and_not_in_a_smooth_image():
    rng = np.random.default_rng(1)
    smooth = rng.random((3, 64, 128)).astype(np.float32) * 0.2
    r = judge.seam_ratio(smooth, 4, 8, 4)
    assert 0.8 < r["ratio"] < 1.2
    stepped = smooth.copy()
    for x0 in range(0, 128, 16):  # windows start every 16 pixels (stride 4 tokens of 4 pixels)
        stepped[:, :, x0:x0 + 16] += 0.3 * ((x0 // 16) % 2)
    assert judge.seam_ratio(stepped, 4, 8, 4)["ratio"] > 2


@pytest.mark.skipif(not (SCENES / "model.json").exists(), reason="no scenes bundle")
def test_committed_scenes_bundle_meets_its_stated_numbers():
    q = json.loads((SCENES / "eval" / "quality.json").read_text())
    m = json.loads((SCENES / "model.json").read_text())
    s = q["samples"]
    assert (s["steps"], s["temperature"]) == (m["sampling"]["steps"], m["sampling"]["temperature"])
    assert s["sampler"] == m["sampling"].get("sampler", "absorbing")
    assert m["sampling"].get("outpaint_edge", 0) == q["outpaint_edge"]["edge"]
    # outpainting continues its input: the new window is judged the input's source far more often
    # than unconditional samples match it
    ct = q["outpaint"]["continuation"]
    assert ct["same_source"] > ct["unconditional_same_source"] + 0.3, ct
    assert q["seams"]["ratio"] < judge.SEAM_BAR, q["seams"]
    assert m["sampling"]["window_stride"] == [q["seams"]["stride"]] * 2
    assert m["sampling"]["window_margin"] == [q["seams"]["margin"]] * 2
    ref = q["reference"]
    # the samples are far closer to the held-out crops than the fakes, and the judge can tell fakes
    assert s["kid_x1000"] < ref["shuffled_tokens"]["kid_x1000"] / 2
    assert s["kid_x1000"] < ref["random_tokens"]["kid_x1000"] / 2
    assert ref["random_tokens"]["real_probability"] < 0.5 < q["heldout_real_probability"]
    assert min(s["source_histogram"]) > 0, "a source is never sampled"
