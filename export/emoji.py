"""Emoji images for a class-conditional colour bundle (issue 40): Noto and Twemoji at 64x64, from npm.

`npm pack` fetches two pinned packages of the emoji-datasource family (the npm registry is reachable),
each checked by its sha256; the 64x64 PNGs and `emoji.json` (category, subcategory, skin-tone
variations) are read from the tarballs in memory, composited onto white and written as RGB:

    python -m export emoji-data --out ~/.cache/absorb/data            # fetch, write, print a summary
    python -m export emoji-data --out ~/.cache/absorb/data --stats    # ... and every table

    DIR/emoji/google/<image>.png    Noto Emoji (Apache-2.0), 64x64 RGB on white, e.g. 1f600.png
    DIR/emoji/twitter/<image>.png   Twemoji (CC-BY 4.0: credit required), the same file names
    DIR/emoji/index.json            one row per image: file, style, unified, design, category, ...
    DIR/emoji/CREDITS.txt           who made the images and under which licence

A design is one emoji (its base unified code): both styles of it and its skin-tone copies share
it. `split` holds out ~8% of the designs, by a seed of its own, stratified by subcategory, with
every variant of a design (skin tone, gender, direction, the code it obsoletes, a pixel-identical
twin such as Norway and Svalbard) on the same side.
`class_of` maps an image to a class under a scheme (SCHEMES: the 9 categories or the `groups`
table below, subcategories merged into 26 classes); `load` returns a split as tensors for a trainer.
The Apple and Facebook sets of the same family are not licensed for this and are never read.
"""

import argparse
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

# style -> (npm package, version, sha256 of the tarball `npm pack` writes)
PACKAGES = {
    "google": ("emoji-datasource-google", "16.0.0",
               "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438"),
    "twitter": ("emoji-datasource-twitter", "16.0.0",
                "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877"),
}
STYLES = tuple(PACKAGES)
SIZE = 64
DEFAULT_OUT = Path.home() / ".cache" / "absorb" / "data"
META = "package/emoji.json"
FORMAT = 1  # of index.json: an index of another format is made again (the images are kept)
IMAGE_NAME = re.compile(r"^[0-9a-f]{2,6}(-[0-9a-f]{2,6})*\.png$")  # emoji.json's `image`, e.g. 1f468-200d-1f373.png
CREDITS = """\
Emoji images, 64x64, composited onto white by `python -m export emoji-data`:
- google/: Noto Emoji by Google, Apache License 2.0 (https://github.com/googlefonts/noto-emoji),
  from the npm package emoji-datasource-google {google}.
- twitter/: Twemoji by Twitter, Inc and other contributors, CC-BY 4.0
  (https://github.com/jdecked/twemoji), from the npm package emoji-datasource-twitter {twitter}.
- index.json's names and categories: emoji-data by Cal Henderson (MIT, https://github.com/iamcal/emoji-data).
"""

# the held-out designs: fixed by this seed, whatever seed a trainer uses
SPLIT_SEED = 40
HELDOUT = 0.08

# Class schemes. Each maps an image's category (`categories`) or subcategory (`groups`) to a class
# name; None drops the image (Component: the five bare skin-tone swatches). Class indices follow
# the order of first appearance of the names in the table.
CATEGORIES = {
    "Smileys & Emotion": "smileys",
    "People & Body": "people",
    "Animals & Nature": "animals & nature",
    "Food & Drink": "food & drink",
    "Travel & Places": "travel & places",
    "Activities": "activities",
    "Objects": "objects",
    "Symbols": "symbols",
    "Flags": "flags",
    "Component": None,
}
# subcategory -> class (emoji.json 16.0: 99 subcategories, 1,906 designs outside Component;
# every class 39-92 designs except flags, 270)
GROUPS = {
    # Smileys & Emotion
    "face-smiling": "smiling faces", "face-affection": "smiling faces", "face-tongue": "smiling faces",
    "face-hand": "smiling faces", "face-hat": "smiling faces", "face-glasses": "smiling faces",
    "face-costume": "smiling faces", "cat-face": "smiling faces", "monkey-face": "smiling faces",
    "face-neutral-skeptical": "worried faces", "face-sleepy": "worried faces", "face-unwell": "worried faces",
    "face-concerned": "worried faces", "face-negative": "worried faces",
    "heart": "hearts & emotions", "emotion": "hearts & emotions",
    # People & Body
    "person": "people", "person-gesture": "people", "person-fantasy": "people",
    "person-role": "people at work",
    "person-activity": "people in action", "person-resting": "people in action",
    "person-sport": "athletes",
    "family": "families", "person-symbol": "families",
    "hand-fingers-open": "hands & body", "hand-fingers-partial": "hands & body", "hand-single-finger": "hands & body",
    "hand-fingers-closed": "hands & body", "hands": "hands & body", "hand-prop": "hands & body",
    "body-parts": "hands & body",
    # Animals & Nature, Food & Drink
    "animal-mammal": "mammals",
    "animal-bird": "birds, fish & bugs", "animal-marine": "birds, fish & bugs", "animal-bug": "birds, fish & bugs",
    "animal-reptile": "birds, fish & bugs", "animal-amphibian": "birds, fish & bugs",
    "plant-flower": "plants, fruit & vegetables", "plant-other": "plants, fruit & vegetables",
    "food-fruit": "plants, fruit & vegetables", "food-vegetable": "plants, fruit & vegetables",
    "food-prepared": "food & drink", "food-asian": "food & drink", "food-sweet": "food & drink",
    "drink": "food & drink", "dishware": "food & drink",
    # Travel & Places
    "transport-ground": "vehicles", "transport-air": "vehicles", "transport-water": "vehicles",
    "place-building": "places", "place-other": "places", "place-geographic": "places", "place-map": "places",
    "place-religious": "places", "hotel": "places",
    "sky & weather": "sky, weather & clocks", "time": "sky, weather & clocks",
    # Activities
    "sport": "activities", "game": "activities", "event": "activities", "arts & crafts": "activities",
    "award-medal": "activities",
    # Objects
    "clothing": "clothing",
    "tool": "tools & household", "household": "tools & household", "science": "tools & household",
    "medical": "tools & household", "lock": "tools & household", "other-object": "tools & household",
    "office": "office & paper", "book-paper": "office & paper", "mail": "office & paper",
    "writing": "office & paper", "money": "office & paper",
    "computer": "devices & music", "phone": "devices & music", "light & video": "devices & music",
    "sound": "devices & music", "music": "devices & music", "musical-instrument": "devices & music",
    # Symbols
    "alphanum": "letters & numbers", "keycap": "letters & numbers",
    "arrow": "arrows & buttons", "av-symbol": "arrows & buttons", "transport-sign": "arrows & buttons",
    "geometric": "shapes & marks", "punctuation": "shapes & marks", "math": "shapes & marks",
    "currency": "shapes & marks", "gender": "shapes & marks", "other-symbol": "shapes & marks",
    "warning": "signs", "religion": "signs", "zodiac": "signs",
    # Flags
    "country-flag": "flags", "flag": "flags", "subdivision-flag": "flags",
    # Component
    "skin-tone": None,
}
# scheme -> (index.json field it reads, table)
SCHEMES = {"categories": ("category", CATEGORIES), "groups": ("subcategory", GROUPS)}
DEFAULT_SCHEME = "groups"


class DataError(Exception):
    """A package that cannot be fetched, a tarball whose bytes are not the pinned ones, or an unsafe
    or unexpected member; the message names the package and the member."""


def npm_pack(package: str, version: str, into: Path) -> Path:
    """`npm pack package@version` into `into`: the path of the tarball."""
    spec = f"{package}@{version}"
    cmd = ["npm", "pack", spec, "--pack-destination", str(into), "--json", "--ignore-scripts"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=into, timeout=900)
    except FileNotFoundError as e:
        raise DataError(f"npm pack {spec}: npm is not installed ({e})") from e
    except subprocess.TimeoutExpired as e:
        raise DataError(f"npm pack {spec} did not finish in {e.timeout:.0f} s") from e
    if r.returncode != 0:
        raise DataError(f"npm pack {spec} failed (exit {r.returncode}): {r.stderr.strip()[-400:]}")
    found = sorted(into.glob(f"{package}-{version}.tgz"))
    if not found:
        raise DataError(f"npm pack {spec} left no {package}-{version}.tgz in {into}")
    return found[0]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(style: str, into: Path, packages: dict, pack) -> Path:
    """The checked tarball of a style's package: fetched by `pack(package, version, into)`."""
    package, version, sha = packages[style]
    path = pack(package, version, into)
    got = sha256_file(path)
    if got != sha:
        raise DataError(f"{package}@{version}: the tarball {path.name} has sha256 {got}, expected {sha} "
                        "(a different upload or a corrupted download: not used)")
    return path


def unsafe(member: tarfile.TarInfo) -> str | None:
    """Why a tar member may not be read (None if it may): a path out of the archive, a link, a device."""
    name = member.name
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts or "\\" in name:
        return "a path outside the archive"
    if not (member.isfile() or member.isdir()):
        return "a link or special file"
    return None


def read_package(tarball: Path, style: str, package: str) -> tuple[dict, dict]:
    """(emoji.json as parsed, {image file name: PNG bytes}) from the style's 64x64 directory. Only those
    members are read, in memory; every member is checked first, and one unsafe member refuses the archive."""
    prefix = f"package/img/{style}/{SIZE}/"
    meta, pngs = None, {}
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for m in tar:
                why = unsafe(m)
                if why:
                    raise DataError(f"{package}: member {m.name!r} is {why}: archive refused")
                wanted = m.name == META or (m.name.startswith(prefix) and IMAGE_NAME.match(m.name[len(prefix):]))
                if not wanted or not m.isfile():
                    continue
                data = tar.extractfile(m).read()
                if m.name == META:
                    meta = json.loads(data)
                else:
                    pngs[m.name[len(prefix):]] = data
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{package}: {tarball.name} is not a readable .tgz ({e})") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{package}: {META} is not JSON ({e})") from e
    if meta is None:
        raise DataError(f"{package}: {tarball.name} has no {META}")
    return meta, pngs


def on_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 4) straight-alpha RGBA composited onto white: uint8 (H, W, 3), rounded.
    alpha 0 gives white, alpha 255 the colour itself."""
    a = rgba[..., 3:4].astype(np.uint32)
    rgb = rgba[..., :3].astype(np.uint32)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def to_rgb(png: bytes, what: str) -> Image.Image:
    """A 64x64 PNG (any mode) as an RGB image on white."""
    try:
        with Image.open(io.BytesIO(png)) as im:
            im.load()
            rgba = np.asarray(im.convert("RGBA"))
    except Exception as e:  # PIL raises many types for a bad file
        raise DataError(f"{what}: not a readable PNG ({e})") from e
    if rgba.shape[:2] != (SIZE, SIZE):
        raise DataError(f"{what}: {rgba.shape[1]}x{rgba.shape[0]}, expected {SIZE}x{SIZE}")
    return Image.fromarray(on_white(rgba), "RGB")


def rows_of(meta: list) -> list[dict]:
    """One row per design and per skin-tone copy (style-free), in emoji.json's order."""
    rows = []
    for e in meta:
        base = {"design": e["unified"], "name": e["name"], "category": e["category"],
                "subcategory": e["subcategory"], "obsoletes": e.get("obsoletes"), "flag": e["category"] == "Flags"}
        rows.append({**base, "unified": e["unified"], "image": e["image"], "skin_tone": None,
                     "has": {s: bool(e.get(f"has_img_{s}")) for s in STYLES}})
        for tone, v in sorted((e.get("skin_variations") or {}).items()):
            rows.append({**base, "unified": v["unified"], "image": v["image"], "skin_tone": tone,
                         "has": {s: bool(v.get(f"has_img_{s}")) for s in STYLES}})
    for r in rows:
        if not IMAGE_NAME.match(r["image"]):
            raise DataError(f"{META}: image name {r['image']!r} of {r['unified']} is not a plain code-point file name")
    return rows


def pixel_hash(img: Image.Image) -> str:
    """A short hash of the RGB pixels: equal for pixel-identical images (Norway and Svalbard, US and
    US Outlying Islands), which the split keeps on one side."""
    return hashlib.sha256(np.asarray(img.convert("RGB")).tobytes()).hexdigest()[:16]


def readable(path: Path) -> Image.Image | None:
    """A file already written, as RGB, or None if it is absent or not a 64x64 RGB PNG (then it is
    written again)."""
    try:
        with Image.open(path) as im:
            img = im.convert("RGB") if im.mode == "RGB" and im.size == (SIZE, SIZE) else None
    except (OSError, ValueError):  # absent, truncated, not an image
        return None
    return img


def atomic_save(img: Image.Image, target: Path):
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    img.save(part, format="PNG")
    part.replace(target)  # atomic: a half-written file is never taken for data


def atomic_text(text: str, target: Path):
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    part.write_text(text)
    part.replace(target)


def prepare(out: Path, packages: dict | None = None, pack=None, log=print) -> dict:
    """Fetch, check and write DIR/emoji (skipping images already there); index.json last, so an
    index whose files all exist is a complete set and nothing is fetched. Returns the index.
    packages (default PACKAGES) and pack (default npm_pack) are there for the tests."""
    packages = PACKAGES if packages is None else packages
    pack = npm_pack if pack is None else pack
    root = out / "emoji"
    index_path = root / "index.json"
    pins = {s: {"package": p, "version": v, "sha256": h} for s, (p, v, h) in packages.items()}
    try:
        old = json.loads(index_path.read_text()) if index_path.exists() else None
    except json.JSONDecodeError:
        old = None  # made again
    if old is not None:
        current = old.get("format") == FORMAT and old.get("packages") == pins
        if current and all((root / r["file"]).exists() for r in old["images"]):
            log(f"present: {index_path} ({len(old['images'])} images)")
            return old
        stale = old.get("packages") != pins
    else:
        stale = False
    images, meta0 = [], None
    with tempfile.TemporaryDirectory(prefix="absorb-emoji-") as tmp:
        for style in packages:
            package, version, _ = packages[style]
            t0 = time.time()
            tarball = fetch(style, Path(tmp), packages, pack)
            meta, pngs = read_package(tarball, style, package)
            tarball.unlink()  # ~70 MB each: not kept while the other is fetched
            if meta0 is None:
                meta0 = meta
            elif meta != meta0:
                raise DataError(f"{package}@{version}: its {META} differs from the first package's")
            written = present = 0
            for r in rows_of(meta):
                if not r["has"][style]:
                    continue
                if r["image"] not in pngs:
                    raise DataError(f"{package}@{version}: {META} lists {r['image']} but the tarball has no "
                                    f"package/img/{style}/{SIZE}/{r['image']}")
                target = root / style / r["image"]
                img = None if stale else readable(target)
                if img is not None:
                    present += 1
                else:
                    img = to_rgb(pngs[r["image"]], f"{package} {r['image']}")
                    atomic_save(img, target)
                    written += 1
                images.append({"file": f"{style}/{r['image']}", "style": style,
                               **{k: v for k, v in r.items() if k not in ("image", "has")},
                               "skin_copy": r["skin_tone"] is not None, "pixels": pixel_hash(img)})
            log(f"{style}: {package}@{version} sha256 ok, {written} images written, {present} present "
                f"({time.time() - t0:.1f}s)")
    atomic_text(CREDITS.format(**{s: v for s, (_, v, _) in packages.items()}), root / "CREDITS.txt")
    index = {"format": FORMAT, "packages": pins, "size": SIZE, "images": images}
    atomic_text(json.dumps(index, indent=0) + "\n", index_path)
    log(f"wrote {index_path} ({len(images)} images)")
    return index


def read_index(root: Path) -> list[dict]:
    """The rows of DIR/emoji/index.json (root = DIR/emoji)."""
    path = root / "index.json"
    if not path.exists():
        raise DataError(f"{path} does not exist: run `python -m export emoji-data --out {root.parent}` first")
    return json.loads(path.read_text())["images"]


# -- designs, the held-out split, classes -------------------------------------------------------

PEOPLE = {"1F468": "P", "1F469": "P", "1F9D1": "P", "1F466": "C", "1F467": "C", "1F9D2": "C",
          "1F474": "O", "1F475": "O", "1F9D3": "O"}  # man/woman/person, boy/girl/child, old man/woman/person
DROPPED = {"FE0F", "200D", "2640", "2642", "27A1"}  # variation selector, joiner, female/male sign, facing right


def family(unified: str) -> str:
    """The design up to gender and direction: man/woman/person cook, facing left or right, share one."""
    parts = [PEOPLE.get(p, p) for p in unified.upper().split("-") if p not in DROPPED]
    return "-".join(parts) or unified.upper()


def groups(rows) -> dict:
    """design -> split group: its family, merged with the design it obsoletes (FAMILY 1F46A is the
    older code of FAMILY: MAN, WOMAN, BOY) and with every design that has a pixel-identical image in a
    style (rows' `pixels`, if there). Skin-tone copies carry their base design."""
    parent = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a, b):
        a, b = find(a), find(b)
        parent[max(a, b)] = min(a, b)

    same = {}
    for r in rows:
        find(family(r["design"]))
        if r.get("obsoletes"):
            union(family(r["design"]), family(r["obsoletes"]))
        if r.get("pixels"):
            union(family(r["design"]), same.setdefault((r["style"], r["pixels"]), family(r["design"])))
    return {r["design"]: find(family(r["design"])) for r in rows}


def _key(group: str) -> str:
    return hashlib.sha256(f"{SPLIT_SEED}:{group}".encode()).hexdigest()


def heldout_designs(rows, fraction: float = HELDOUT) -> set:
    """The held-out designs: whole split groups, ~fraction of them, stratified by subcategory.

    Groups are ordered by (category, subcategory, a hash of the seed and the group) and taken
    systematically, every 1/fraction-th from an offset fixed by the seed: any run of n groups in that
    order (a subcategory, a category, a class of merged subcategories) gets n * fraction of them held
    out, give or take one. Every group counts once, whatever its size (weighing groups by their
    designs would hold the big ones out more often and overshoot the fraction). Depends only on the
    designs, which of them have pixel-identical images, and SPLIT_SEED: not on any training seed,
    the class table or the order of the rows."""
    of = groups(rows)
    members, where = defaultdict(set), {}
    for r in rows:
        g = of[r["design"]]
        members[g].add(r["design"])
        where[g] = min(where.get(g, (r["category"], r["subcategory"])), (r["category"], r["subcategory"]))
    order = sorted(members, key=lambda g: (*where[g], _key(g)))
    acc = int(_key("offset")[:8], 16) / 16 ** 8
    held = set()
    for g in order:
        acc += fraction
        if acc >= 1:
            acc -= 1
            held |= members[g]
    return held


def split(rows, fraction: float = HELDOUT) -> tuple[list, list]:
    """(train rows, held-out rows) of index rows: both styles and every skin-tone, gender or direction
    variant of a design on the same side."""
    held = heldout_designs(rows, fraction)
    return [r for r in rows if r["design"] not in held], [r for r in rows if r["design"] in held]


def class_names(scheme: str = DEFAULT_SCHEME) -> list[str]:
    if scheme not in SCHEMES:
        raise DataError(f"unknown class scheme {scheme!r}; known: {sorted(SCHEMES)}")
    return list(dict.fromkeys(c for c in SCHEMES[scheme][1].values() if c is not None))


def class_of(row: dict, scheme: str = DEFAULT_SCHEME) -> int | None:
    """The class index of an index row under a scheme; None for an image the scheme leaves out."""
    field, table = SCHEMES[scheme]
    if row[field] not in table:
        raise DataError(f"{row['unified']}: {field} {row[field]!r} is not in the {scheme} table of emoji.py")
    name = table[row[field]]
    return None if name is None else class_names(scheme).index(name)


def select(rows, which: str, scheme: str = DEFAULT_SCHEME, skin_tones: bool = False, styles=STYLES):
    """Rows of a split ("train", "heldout" or "all") with their class, without skin-tone copies unless
    skin_tones, and without the images the scheme leaves out: [(row, class index)]."""
    if which not in ("train", "heldout", "all"):
        raise DataError(f"split {which!r}: expected train, heldout or all")
    train, held = split(rows)
    part = {"train": train, "heldout": held, "all": rows}[which]
    out = []
    for r in part:
        c = class_of(r, scheme)
        if c is not None and r["style"] in styles and (skin_tones or not r["skin_copy"]):
            out.append((r, c))
    return out


def load(root: Path, which: str = "train", scheme: str = DEFAULT_SCHEME, skin_tones: bool = False,
         styles=STYLES, as_float: bool = True):
    """A split as tensors for a trainer: (x (N, 3, 64, 64) float32 in [0, 1], or uint8 if not as_float;
    labels int64 (N,); the index rows), in index order. root = DIR/emoji."""
    import torch  # here, so that fetching the data needs only Pillow and numpy

    picked = select(read_index(root), which, scheme, skin_tones, styles)
    if not picked:
        raise DataError(f"{root}: no image in split {which!r} for styles {list(styles)}")
    x = np.empty((len(picked), 3, SIZE, SIZE), np.uint8)
    for i, (r, _) in enumerate(picked):
        with Image.open(root / r["file"]) as im:
            a = np.asarray(im.convert("RGB"))
        if a.shape != (SIZE, SIZE, 3):
            raise DataError(f"{root / r['file']}: {a.shape[1]}x{a.shape[0]}, expected {SIZE}x{SIZE}")
        x[i] = a.transpose(2, 0, 1)
    x = torch.from_numpy(x)
    y = torch.tensor([c for _, c in picked], dtype=torch.int64)
    return (x.float() / 255.0 if as_float else x), y, [r for r, _ in picked]


# -- statistics -----------------------------------------------------------------------------------

def statistics(rows, full: bool = False) -> list[str]:
    """Lines of counts: images per style, designs, skin-tone copies, flags; designs per category and
    per class of each scheme, with the split and the images each choice on skin tones gives; with
    full, per subcategory too."""
    held = heldout_designs(rows)
    designs = {r["design"]: r for r in rows}
    per_style = Counter(r["style"] for r in rows)
    copies = {r["unified"] for r in rows if r["skin_copy"]}
    n_component = len({r["design"] for r in rows if r["category"] == "Component"})
    lines = [f"images: {len(rows)} ({', '.join(f'{s} {n}' for s, n in per_style.items())}); designs: {len(designs)} "
             f"({len(designs) - n_component} outside Component) in {len(set(groups(rows).values()))} split groups, "
             f"{len(held)} held out ({len(held) / len(designs):.1%}); "
             f"per style: {len(copies)} skin-tone copies of {len({r['design'] for r in rows if r['skin_copy']})} "
             f"designs, {len({r['design'] for r in rows if r['flag']})} flags"]

    def table(title, key, labels, warn=False):
        """labels: [(key value, printed name)] in order; None for every value seen, largest first."""
        ds, imgs, imgs_all = defaultdict(set), Counter(), Counter()
        for r in rows:
            k = key(r)
            ds[k].add(r["design"])
            imgs_all[k] += 1
            imgs[k] += not r["skin_copy"]
        if labels is None:
            labels = [(k, str(k)) for k in sorted(ds, key=lambda k: (-len(ds[k]), str(k)))]
        lines.append(f"{title:<34} {'designs':>7} {'train':>6} {'held':>5} {'images':>7} {'with skin copies':>16}")
        for k, name in labels:
            d = ds.get(k, set())
            lines.append(f"  {name[:32]:<32} {len(d):>7} {len(d - held):>6} {len(d & held):>5} {imgs[k]:>7} "
                         f"{imgs_all[k]:>16}")
            if warn and k is not None and d and not d & held:
                lines.append(f"  WARNING: {name} has no held-out design")

    table("category", lambda r: r["category"], None)
    for scheme in SCHEMES:
        names = class_names(scheme)
        labels = [(i, f"{i:>2} {n}") for i, n in enumerate(names)] + [(None, "(left out)")]
        table(f"class, scheme {scheme} ({len(names)})", lambda r, s=scheme: class_of(r, s), labels, warn=True)
    if full:
        table("subcategory", lambda r: f"{r['category'].split()[0]}/{r['subcategory']}", None)
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m export emoji-data", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where to put emoji/ (default {DEFAULT_OUT})")
    p.add_argument("--stats", action="store_true", help="print the counts per subcategory too")
    args = p.parse_args(argv)
    t0 = time.time()
    try:
        index = prepare(args.out)
        lines = statistics(index["images"], full=args.stats)
    except DataError as e:
        sys.exit(f"emoji-data: {e}")
    print("\n".join(lines))
    print(f"done in {time.time() - t0:.1f}s: {args.out / 'emoji'} (credit Twemoji CC-BY 4.0 and Noto Apache-2.0: "
          "see CREDITS.txt)")
