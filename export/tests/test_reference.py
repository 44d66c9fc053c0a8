"""Smoke test of reference.py on a tiny random bundle: the three peers run and report, (a) holds
the bundle's weights, a bundle without torch weights skips (a), bad arguments fail. About 15 s.

    python -m pytest -q export/tests/test_reference.py
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ABSORB = ROOT / "target/release/absorb"
TINY = {  # test_export.py's TINY
    "img_size": 16, "n_channels": 3, "nf": 8, "ch_mult": [1, 2], "res_blocks": 2,
    "attn_resolutions": [16, 8], "codebook_size": 32, "emb_dim": 8, "latent_shape": [1, 8, 8],
    "bert_n_emb": 32, "bert_n_head": 2, "bert_n_layers": 1, "block_size": 64, "norm_groups": 4,
}


def run(*args):
    return subprocess.run([sys.executable, "-m", "export", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    if not ABSORB.is_file():
        pytest.skip(f"{ABSORB} is missing (make build)")
    d = tmp_path_factory.mktemp("reference")
    (d / "tiny.json").write_text(json.dumps(TINY))
    out = run("official", "--random-init", "--seed", "3", "--hparams", d / "tiny.json",
              "--out", d / "b", "--steps", "8")
    assert out.returncode == 0, out.stderr
    return d / "b"


def test_three_peers_report_and_torch_holds_the_bundle_weights(bundle, tmp_path):
    out = run("reference", "--bundle", bundle, "--count", "2", "--reps", "2", "--json",
              tmp_path / "r.json")
    assert out.returncode == 0, out.stdout + out.stderr
    for row in ("(a) official loop, torch eager", "(b) official loop, onnxruntime fp32",
                "(c) absorb bench fp32", "within 0.0001"):
        assert row in out.stdout, out.stdout
    r = json.loads((tmp_path / "r.json").read_text())
    assert [len(r["runs"][k]) for k in "abc"] == [2, 2, 2]
    assert r["verify"]["max_abs_diff"] <= 1e-4
    assert all(x["calls"] == 8 and x["per_image_ms"] > 0 for k in "ab" for x in r["runs"][k])
    assert all(x["steps"] == 8 and x["count"] == 2 for x in r["runs"]["c"])


def test_a_bundle_without_torch_weights_skips_a(bundle, tmp_path):
    b = tmp_path / "b"
    b.mkdir()
    for f in bundle.iterdir():
        (b / f.name).symlink_to(f)
    m = json.loads((bundle / "model.json").read_text())
    m["provenance"]["source"] = "python -m export train-digits --seed 0"
    (b / "model.json").unlink()
    (b / "model.json").write_text(json.dumps(m))
    out = run("reference", "--bundle", b, "--count", "1", "--reps", "1")
    assert out.returncode == 0, out.stderr
    assert "(a) skipped" in out.stdout and "(a) official" not in out.stdout
    assert "(b) official loop" in out.stdout and "(c) absorb bench" in out.stdout


def test_bad_arguments_fail_clearly(bundle, tmp_path):
    out = run("reference", "--bundle", tmp_path)
    assert out.returncode == 2 and "no model.json" in out.stderr
    out = run("reference", "--bundle", bundle, "--steps", "65")
    assert out.returncode == 2 and "--steps 65 must be in 1..=64" in out.stderr
    out = run("reference", "--bundle", bundle, "--variant", "int8")
    assert out.returncode == 2 and "python -m export variants" in out.stderr
