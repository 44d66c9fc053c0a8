"""The emoji data (export/emoji.py) without the network: fetching, checking and extracting fake npm
tarballs made here, compositing onto white, the held-out split of designs, the class schemes and the
loader; and, if `python -m export emoji-data` has run, the real data against the same rules."""

import hashlib
import io
import json
import random
import shutil
import stat
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export import emoji

REAL = Path.home() / ".cache" / "absorb" / "data" / "emoji"

# a small emoji.json: a face, a person with one skin-tone copy, gender variants of a role, a flag,
# a bare skin-tone swatch (Component)
META = [
    {"name": "GRINNING FACE", "unified": "1F600", "image": "1f600.png", "category": "Smileys & Emotion",
     "subcategory": "face-smiling", "has_img_google": True, "has_img_twitter": True},
    {"name": "FATHER CHRISTMAS", "unified": "1F385", "image": "1f385.png", "category": "People & Body",
     "subcategory": "person-fantasy", "has_img_google": True, "has_img_twitter": True,
     "skin_variations": {"1F3FB": {"unified": "1F385-1F3FB", "image": "1f385-1f3fb.png", "has_img_google": True,
                                   "has_img_twitter": True}}},
    {"name": "COOK", "unified": "1F9D1-200D-1F373", "image": "1f9d1-200d-1f373.png", "category": "People & Body",
     "subcategory": "person-role", "has_img_google": True, "has_img_twitter": True},
    {"name": "MAN COOK", "unified": "1F468-200D-1F373", "image": "1f468-200d-1f373.png", "category": "People & Body",
     "subcategory": "person-role", "has_img_google": True, "has_img_twitter": True},
    {"name": "France Flag", "unified": "1F1EB-1F1F7", "image": "1f1eb-1f1f7.png", "category": "Flags",
     "subcategory": "country-flag", "has_img_google": True, "has_img_twitter": True},
    {"name": "EMOJI MODIFIER FITZPATRICK TYPE-1-2", "unified": "1F3FB", "image": "1f3fb.png", "category": "Component",
     "subcategory": "skin-tone", "has_img_google": True, "has_img_twitter": True},
]
COLOUR = {"google": (200, 30, 10), "twitter": (10, 60, 220)}


def sprite(colour, size=64, palette=False):
    """A transparent square with an opaque coloured centre, as PNG bytes: RGBA, or a palette image
    whose entry 0 is transparent."""
    a = np.zeros((size, size), np.uint8)
    a[size // 4:3 * size // 4, size // 4:3 * size // 4] = 1
    if palette:
        img = Image.fromarray(a, "P")
        img.putpalette([0, 255, 0, *colour])  # a transparent pixel's colour must not show: green here
        img.info["transparency"] = 0
    else:
        rgba = np.zeros((size, size, 4), np.uint8)
        rgba[a == 1] = (*colour, 255)
        img = Image.fromarray(rgba, "RGBA")
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0) if palette else img.save(buf, format="PNG")
    return buf.getvalue()


def add(tar, name, data=b"", kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, len(data), link
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def tarball(path, style, extra=(), meta=META):
    """A fake emoji-datasource-<style> tarball: package/emoji.json and 64x64 PNGs of the style, plus an
    Apple image (never to be read) and `extra` (name, data, type, link) members."""
    with tarfile.open(path, "w:gz") as tar:
        add(tar, "package/package.json", b"{}")
        add(tar, "package/emoji.json", json.dumps(meta).encode())
        for e in meta:
            names = [e["image"]] + [v["image"] for v in e.get("skin_variations", {}).values()]
            for n in names:
                add(tar, f"package/img/{style}/64/{n}", sprite(COLOUR[style]))
                add(tar, f"package/img/{style}/32/{n}", sprite(COLOUR[style], 32))
        add(tar, "package/img/apple/64/1f600.png", sprite((0, 255, 0)))
        for m in extra:
            add(tar, *m)
    return path


def fake_npm(tmp_path, extra=(), meta=META):
    """(packages with the fake tarballs' sha256, pack function that copies them, list of calls)."""
    src = tmp_path / "registry"
    src.mkdir(exist_ok=True)
    packages, calls = {}, []
    for style in emoji.STYLES:
        name = f"emoji-datasource-{style}"
        t = tarball(src / f"{name}-16.0.0.tgz", style, extra, meta)
        packages[style] = (name, "16.0.0", hashlib.sha256(t.read_bytes()).hexdigest())

    def pack(package, version, into):
        calls.append(package)
        return Path(shutil.copy(src / f"{package}-{version}.tgz", into))

    return packages, pack, calls


def test_on_white_is_white_where_transparent_and_the_colour_where_opaque():
    rgba = np.array([[[10, 200, 30, 0], [10, 200, 30, 255]], [[0, 0, 0, 128], [255, 0, 100, 64]]], np.uint8)
    rgb = emoji.on_white(rgba)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[0, 0].tolist() == [255, 255, 255]  # alpha 0: white, whatever the colour
    assert rgb[0, 1].tolist() == [10, 200, 30]  # alpha 255: the colour itself
    assert rgb[1, 0].tolist() == [127, 127, 127]  # half black: half white (255 * 127 / 255)
    assert rgb[1, 1].tolist() == [255, 191, 216]  # 255*0.25+255*0.75, 0+191, 100*0.25+191
    # palette PNGs with transparency (another mode than RGBA) come out the same
    img = emoji.to_rgb(sprite((200, 30, 10), palette=True), "test")
    a = np.asarray(img)
    assert img.mode == "RGB" and a.shape == (64, 64, 3)
    assert a[0, 0].tolist() == [255, 255, 255] and a[32, 32].tolist() == [200, 30, 10]


def test_an_image_of_another_size_is_refused_naming_it():
    with pytest.raises(emoji.DataError, match=r"pkg 1f600.png: 32x32, expected 64x64"):
        emoji.to_rgb(sprite((1, 2, 3), 32), "pkg 1f600.png")
    with pytest.raises(emoji.DataError, match="pkg x.png: not a readable PNG"):
        emoji.to_rgb(b"not a png", "pkg x.png")


def test_prepare_writes_rgb_images_and_an_index_then_skips_what_is_present(tmp_path):
    packages, pack, calls = fake_npm(tmp_path)
    out = tmp_path / "data"
    index = emoji.prepare(out, packages, pack, log=lambda s: None)
    root = out / "emoji"
    assert calls == ["emoji-datasource-google", "emoji-datasource-twitter"]
    assert not (root / "apple").exists() and sorted(p.name for p in root.iterdir()) == [
        "CREDITS.txt", "google", "index.json", "twitter"]
    assert not list(root.rglob("*.part"))
    rows = index["images"]
    assert json.loads((root / "index.json").read_text()) == index
    assert len(rows) == 2 * 7 and Counter(r["style"] for r in rows) == {"google": 7, "twitter": 7}
    for r in rows:
        a = np.asarray(Image.open(root / r["file"]))
        assert a.shape == (64, 64, 3), r["file"]
        assert a[0, 0].tolist() == [255, 255, 255] and a[32, 32].tolist() == list(COLOUR[r["style"]])
    santa = {r["unified"]: r for r in rows if r["style"] == "twitter" and r["design"] == "1F385"}
    assert santa["1F385-1F3FB"]["skin_copy"] and santa["1F385-1F3FB"]["skin_tone"] == "1F3FB"
    assert not santa["1F385"]["skin_copy"] and santa["1F385"]["file"] == "twitter/1f385.png"
    assert [r["flag"] for r in rows if r["style"] == "google"] == [False, False, False, False, False, True, False]
    assert "CC-BY 4.0" in (root / "CREDITS.txt").read_text()

    log = []
    assert emoji.prepare(out, packages, pack, log=log.append) == index
    assert len(calls) == 2 and log[0].startswith("present:")  # nothing fetched the second time
    (root / "twitter" / "1f600.png").unlink()
    (root / "twitter" / "1f385.png").write_bytes(b"truncated")
    kept = np.full((64, 64, 3), 7, np.uint8)  # a readable image is taken as present, not rewritten
    Image.fromarray(kept).save(root / "google" / "1f600.png")
    log = []
    emoji.prepare(out, packages, pack, log=log.append)
    assert "0 images written, 7 present" in log[0] and "2 images written, 5 present" in log[1], log
    assert (np.asarray(Image.open(root / "google" / "1f600.png")) == 7).all()
    assert np.asarray(Image.open(root / "twitter" / "1f385.png"))[32, 32].tolist() == list(COLOUR["twitter"])


def test_a_wrong_sha256_is_refused_naming_the_package(tmp_path):
    packages, pack, _ = fake_npm(tmp_path)
    name, version, sha = packages["twitter"]
    packages["twitter"] = (name, version, "0" * 64)
    with pytest.raises(emoji.DataError, match=r"emoji-datasource-twitter@16.0.0: the tarball .* has sha256 "
                                              rf"{sha}, expected 0{{64}}"):
        emoji.prepare(tmp_path / "data", packages, pack, log=lambda s: None)
    assert not (tmp_path / "data" / "emoji" / "index.json").exists()


@pytest.mark.parametrize("member", [
    ("package/img/google/64/../../../../evil.png", b"x"),
    ("../evil.png", b"x"),
    ("/tmp/evil.png", b"x"),
    ("package/img/google/64/1f4a9.png", b"", tarfile.SYMTYPE, "/etc/passwd"),
    ("package/emoji2.json", b"", tarfile.LNKTYPE, "package/emoji.json"),
])
def test_an_unsafe_member_refuses_the_archive(tmp_path, member):
    packages, pack, _ = fake_npm(tmp_path, extra=[member])
    with pytest.raises(emoji.DataError, match=rf"emoji-datasource-google: member '{member[0]}' is a "):
        emoji.prepare(tmp_path / "data", packages, pack, log=lambda s: None)
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "data" / "emoji" / "index.json").exists()


def test_a_listed_image_missing_from_the_tarball_is_an_error(tmp_path):
    packages, pack, _ = fake_npm(tmp_path)
    src = tmp_path / "registry" / "emoji-datasource-google-16.0.0.tgz"
    with tarfile.open(src, "w:gz") as tar:  # emoji.json without the images it lists
        add(tar, "package/emoji.json", json.dumps(META).encode())
    packages["google"] = (*packages["google"][:2], hashlib.sha256(src.read_bytes()).hexdigest())
    with pytest.raises(emoji.DataError, match="emoji-datasource-google@16.0.0: package/emoji.json lists 1f600.png"):
        emoji.prepare(tmp_path / "data", packages, pack, log=lambda s: None)


def npm_script(tmp_path, monkeypatch, body):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text("#!/bin/sh\n" + body)
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(bin_dir))


def test_a_failed_npm_pack_is_an_error_naming_the_package(tmp_path, monkeypatch):
    npm_script(tmp_path, monkeypatch, 'echo "npm error 404 Not Found - GET https://registry.npmjs.org/$2" >&2\n'
                                      'exit 1\n')
    with pytest.raises(emoji.DataError, match=r"npm pack emoji-datasource-google@16.0.0 failed \(exit 1\): "
                                              r"npm error 404 Not Found"):
        emoji.npm_pack("emoji-datasource-google", "16.0.0", tmp_path)
    # the command line says it and exits 1 (PACKAGES and npm_pack are looked up when prepare runs)
    with pytest.raises(SystemExit) as e:
        emoji.main(["--out", str(tmp_path / "data")])
    assert "emoji-data: npm pack emoji-datasource-google@16.0.0 failed" in str(e.value.code)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(emoji.DataError, match="npm pack emoji-datasource-google@16.0.0: npm is not installed"):
        emoji.npm_pack("emoji-datasource-google", "16.0.0", tmp_path)


def test_npm_pack_finds_the_tarball_npm_wrote(tmp_path, monkeypatch):
    # a stand-in npm that writes the tarball where --pack-destination says, as npm does
    npm_script(tmp_path, monkeypatch, 'echo tgz > "$4/emoji-datasource-google-16.0.0.tgz"\necho "[]"\n')
    into = tmp_path / "into"
    into.mkdir()
    assert emoji.npm_pack("emoji-datasource-google", "16.0.0", into) == into / "emoji-datasource-google-16.0.0.tgz"
    (tmp_path / "bin" / "npm").write_text('#!/bin/sh\necho "[]"\n')  # succeeds, writes nothing
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(emoji.DataError, match="left no emoji-datasource-google-16.0.0.tgz"):
        emoji.npm_pack("emoji-datasource-google", "16.0.0", other)


# -- the split and the classes, on a synthetic index ----------------------------------------------

# the category of each class of GROUPS (None: Component)
CATEGORY_OF = {
    "Smileys & Emotion": ["smiling faces", "worried faces", "hearts & emotions"],
    "People & Body": ["people", "people at work", "people in action", "athletes", "families", "hands & body"],
    "Animals & Nature": ["mammals", "birds, fish & bugs", "plants, fruit & vegetables"],
    "Food & Drink": ["food & drink"],
    "Travel & Places": ["vehicles", "places", "sky, weather & clocks"],
    "Activities": ["activities"],
    "Objects": ["clothing", "tools & household", "office & paper", "devices & music"],
    "Symbols": ["letters & numbers", "arrows & buttons", "shapes & marks", "signs"],
    "Flags": ["flags"],
    "Component": [None],
}


def synthetic_rows(n_per_sub=30, seed=0):
    """Index rows over every subcategory of GROUPS: n + 1 designs each (one with a skin-tone copy,
    a woman and a man variant of one design), in both styles."""
    cat_of = {c: cat for cat, classes in CATEGORY_OF.items() for c in classes}
    rows, code = [], 0x10000
    for sub, cls in emoji.GROUPS.items():
        cat = cat_of[cls]
        for i in range(n_per_sub):
            code += 1
            design = f"{code:X}"
            variants = [(design, None)]
            if i == 0:
                variants.append((f"{design}-1F3FB", "1F3FB"))
            if i == 1:  # woman X and man X (X = 10001...): two designs, one family
                design = f"1F469-200D-{code:X}"
                variants = [(design, None), (f"1F468-200D-{code:X}", None)]
            for unified, tone in variants:
                d = design if tone else unified
                for style in emoji.STYLES:
                    rows.append({"file": f"{style}/{unified.lower()}.png", "style": style, "unified": unified,
                                 "design": d, "name": unified, "category": cat, "subcategory": sub,
                                 "obsoletes": None, "flag": cat == "Flags", "skin_tone": tone,
                                 "skin_copy": tone is not None})
    random.Random(seed).shuffle(rows)
    return rows


def test_the_split_is_deterministic_design_disjoint_and_stratified():
    rows = synthetic_rows()
    train, held = emoji.split(rows)
    assert len(train) + len(held) == len(rows)
    again = emoji.split(synthetic_rows(seed=1))  # the same rows in another order: the same split
    assert {r["file"] for r in again[1]} == {r["file"] for r in held}
    d_train, d_held = {r["design"] for r in train}, {r["design"] for r in held}
    assert not d_train & d_held  # both styles and skin-tone copies follow their design
    n_designs = len(d_train | d_held)
    assert abs(len(d_held) / n_designs - emoji.HELDOUT) < 0.01, len(d_held) / n_designs
    per_sub = Counter(r["subcategory"] for r in held if r["style"] == "google" and not r["skin_copy"])
    assert set(per_sub) == set(emoji.GROUPS)  # every subcategory (30 designs: 2.4 expected) has some
    assert max(per_sub.values()) <= 4 and min(per_sub.values()) >= 1, per_sub
    # gender variants (woman X, man X) are one group: together on one side
    fam = {}
    for r in rows:
        fam.setdefault(emoji.family(r["design"]), set()).add(r["design"] in d_held)
    assert all(len(sides) == 1 for sides in fam.values())
    assert emoji.family("1F469-200D-1F373") == emoji.family("1F9D1-200D-1F373") == emoji.family("1F468-200D-1F373")
    assert emoji.family("1F6B6-200D-2642-FE0F-200D-27A1-FE0F") == emoji.family("1F6B6")  # man walking facing right
    assert emoji.family("1F600") != emoji.family("1F601")


def test_a_design_goes_with_the_one_it_obsoletes():
    rows = [{"design": "1F46A", "obsoletes": None}, {"design": "1F468-200D-1F469-200D-1F466", "obsoletes": "1F46A"},
            {"design": "1F469-200D-1F469-200D-1F467", "obsoletes": None}, {"design": "1F600", "obsoletes": None}]
    g = emoji.groups(rows)
    assert g["1F46A"] == g["1F468-200D-1F469-200D-1F466"] == g["1F469-200D-1F469-200D-1F467"] != g["1F600"]


def test_classes_under_each_scheme():
    assert emoji.class_names("categories") == ["smileys", "people", "animals & nature", "food & drink",
                                               "travel & places", "activities", "objects", "symbols", "flags"]
    names = emoji.class_names("groups")
    assert len(names) == 26 and names[0] == "smiling faces" and names[-1] == "flags"
    row = {"unified": "1F600", "category": "Smileys & Emotion", "subcategory": "face-smiling"}
    assert emoji.class_of(row, "categories") == 0 and emoji.class_of(row, "groups") == 0
    swatch = {"unified": "1F3FB", "category": "Component", "subcategory": "skin-tone"}
    assert emoji.class_of(swatch, "categories") is None and emoji.class_of(swatch, "groups") is None
    with pytest.raises(emoji.DataError, match="1F9E0: subcategory 'brains' is not in the groups table"):
        emoji.class_of({"unified": "1F9E0", "category": "People & Body", "subcategory": "brains"}, "groups")
    with pytest.raises(emoji.DataError, match="unknown class scheme 'colours'"):
        emoji.class_names("colours")
    rows = synthetic_rows()
    for scheme in emoji.SCHEMES:
        picked = emoji.select(rows, "heldout", scheme)
        assert not any(r["skin_copy"] or r["category"] == "Component" for r, _ in picked)
        assert {c for _, c in picked} == set(range(len(emoji.class_names(scheme)))), scheme  # every class held out
    with_copies = emoji.select(rows, "all", skin_tones=True)
    assert sum(r["skin_copy"] for r, _ in with_copies) == 2 * (len(emoji.GROUPS) - 1)


def test_load_returns_tensors_of_a_split(tmp_path):
    packages, pack, _ = fake_npm(tmp_path)
    emoji.prepare(tmp_path / "data", packages, pack, log=lambda s: None)
    x, y, rows = emoji.load(tmp_path / "data" / "emoji", "all", "categories")
    assert tuple(x.shape) == (10, 3, 64, 64) and str(x.dtype) == "torch.float32"  # 5 designs x 2 styles
    assert float(x.min()) >= 0 and float(x.max()) == 1.0 and float(x[0, :, 0, 0].min()) == 1.0
    assert y.tolist() == [emoji.class_of(r, "categories") for r in rows] and set(y.tolist()) == {0, 1, 8}
    xu, yu, _ = emoji.load(tmp_path / "data" / "emoji", "all", skin_tones=True, styles=("twitter",), as_float=False)
    assert tuple(xu.shape) == (6, 3, 64, 64) and str(xu.dtype) == "torch.uint8"  # and Santa's skin-tone copy
    assert xu[:, :, 32, 32].tolist() == [list(COLOUR["twitter"])] * 6
    with pytest.raises(emoji.DataError, match="index.json does not exist: run `python -m export emoji-data"):
        emoji.load(tmp_path / "nothing" / "emoji")


@pytest.mark.skipif(not (REAL / "index.json").exists(), reason=f"{REAL} not made (python -m export emoji-data)")
def test_the_real_data_follows_the_same_rules():
    rows = emoji.read_index(REAL)
    assert Counter(r["style"] for r in rows) == {"google": 3786, "twitter": 3786}
    assert {r["style"] for r in rows} == {"google", "twitter"}  # never Apple or Facebook
    base = {r["design"] for r in rows if r["category"] != "Component"}
    assert len(base) == 1906
    train, held = emoji.split(rows)
    assert not {r["design"] for r in train} & {r["design"] for r in held}
    assert 0.07 < len({r["design"] for r in held}) / len({r["design"] for r in rows}) < 0.09
    for scheme in emoji.SCHEMES:
        names = emoji.class_names(scheme)
        per = Counter(c for _, c in emoji.select(rows, "heldout", scheme))
        assert all(per[i] >= 2 for i in range(len(names))), (scheme, per)  # every class has held-out designs
    sizes = Counter(emoji.class_of(r, "groups") for r in rows if r["style"] == "google" and not r["skin_copy"])
    assert min(n for c, n in sizes.items() if c is not None) >= 39, sizes
    for r in random.Random(0).sample(rows, 20):
        a = np.asarray(Image.open(REAL / r["file"]))
        assert a.shape == (64, 64, 3) and a.dtype == np.uint8, r["file"]
