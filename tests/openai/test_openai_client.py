"""The OpenAI images API of `absorb serve`, driven by the official `openai` Python client (PyPI,
pinned in requirements.txt): generate, edit, variation, list and retrieve models, and errors. Every
image's PNG bytes must equal what the `absorb` CLI writes for the same seed and settings.

Run by `make openai-test` (part of `make test`), against the real digits bundle:

    ABSORB_BIN=target/release/absorb python -m pytest -q tests/openai
"""

import base64
import io
import os
import struct
import subprocess
import threading
import zlib
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("ABSORB_BIN", str(ROOT / "target/release/absorb"))
MODEL = str(ROOT / "models/digits")
SOURCE = sorted((ROOT / "models/digits/eval/heldout").glob("*.png"))[0]


def png(width, height, pixel, mode="RGBA"):
    """A PNG of `pixel(x, y)` -> a tuple of 1 (gray) or 4 (RGBA) bytes, 8 bits each."""
    kind, channels = {"RGBA": (6, 4), "L": (0, 1)}[mode]
    raw = b"".join(b"\0" + b"".join(bytes(pixel(x, y)) for x in range(width)) for y in range(height))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, kind, 0, 0, 0)
    assert channels in (1, 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def cli(tmp, *args):
    """Runs absorb in `tmp`; returns nothing, raises with its stderr on failure."""
    p = subprocess.run([BIN, *args], cwd=tmp, capture_output=True, text=True)
    assert p.returncode == 0, f"absorb {args}: {p.stderr}"


@pytest.fixture(scope="module")
def client():
    # Every shipped bundle, as a device would serve them (digits, the first, is the default).
    server = subprocess.Popen([BIN, "serve", "--models", str(ROOT / "models"), "--listen", "127.0.0.1:0",
                               "--threads", "1", "--max-loaded", "1"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    addr = None
    for line in server.stderr:
        if line.startswith("listening on "):
            addr = line.split()[-1]
            break
    assert addr, "absorb serve printed no `listening on ADDR`"
    # Keep reading its log so that it never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
    yield openai.OpenAI(base_url=f"http://{addr}/v1", api_key="unused", max_retries=0, timeout=120)
    server.terminate()
    assert server.wait(timeout=60) == 0


def b64(item):
    return base64.b64decode(item.b64_json)


def test_generate_with_a_class_as_the_prompt_equals_the_cli(client, tmp_path):
    r = client.images.generate(model="digits", prompt="7", n=2, size="32x32", response_format="b64_json",
                               extra_body={"seed": 7, "steps": 8})
    assert len(r.data) == 2 and r.data[0].revised_prompt == "7"
    cli(tmp_path, "generate", "-m", MODEL, "--seed", "7", "--class", "7", "--steps", "8", "-n", "2", "-o", "out/")
    for i, item in enumerate(r.data):
        assert b64(item) == (tmp_path / f"out/7-{i:06}.png").read_bytes(), f"image {i}"
    # No model, no size, an empty prompt: the bundle's defaults, the classes spread as without --class.
    r = client.images.generate(prompt="", extra_body={"seed": 3})
    cli(tmp_path, "generate", "-m", MODEL, "--seed", "3", "-o", "three.png")
    assert b64(r.data[0]) == (tmp_path / "three.png").read_bytes()
    assert "spread" in r.model_extra["absorb_note"]


def test_edit_regenerates_the_transparent_pixels_as_the_cli_inpaints_the_white_ones(client, tmp_path):
    side = 32
    # OpenAI's mask: transparent = regenerate (the right half); absorb's: white = regenerate.
    mask = png(side, side, lambda x, y: (0, 0, 0, 0 if x >= side // 2 else 255))
    (tmp_path / "white.png").write_bytes(png(side, side, lambda x, y: (255 if x >= side // 2 else 0,), mode="L"))
    r = client.images.edit(image=open(SOURCE, "rb"), mask=("mask.png", io.BytesIO(mask), "image/png"),
                           prompt="3", n=2, extra_body={"seed": 5, "steps": 8})
    assert len(r.data) == 2
    cli(tmp_path, "inpaint", "-m", MODEL, "--image", str(SOURCE), "--mask", "white.png", "--class", "3",
        "--seed", "5", "--steps", "8", "-o", "e.png")
    assert b64(r.data[0]) == (tmp_path / "e.png").read_bytes()
    assert b64(r.data[1]) != b64(r.data[0]), "the second edit has its own stream"


def test_a_variation_equals_the_clis_vary_at_the_bundles_strength(client, tmp_path):
    r = client.images.create_variation(image=open(SOURCE, "rb"), n=2, extra_body={"seed": 4, "steps": 8})
    assert len(r.data) == 2
    for i in range(2):
        cli(tmp_path, "vary", "-m", MODEL, "--image", str(SOURCE), "--seed", "4", "--steps", "8",
            "--first-index", str(i), "-o", f"v{i}.png")
        assert b64(r.data[i]) == (tmp_path / f"v{i}.png").read_bytes(), f"variation {i}"
    r = client.images.create_variation(image=open(SOURCE, "rb"), extra_body={"seed": 4, "steps": 8, "strength": 0.2})
    cli(tmp_path, "vary", "-m", MODEL, "--image", str(SOURCE), "--seed", "4", "--steps", "8", "--strength", "0.2",
        "-o", "weak.png")
    assert b64(r.data[0]) == (tmp_path / "weak.png").read_bytes()


def test_a_bundle_without_classes_takes_any_prompt_and_says_it_steered_nothing(client, tmp_path):
    r = client.images.generate(model="scenes", prompt="a lighthouse at dusk", extra_body={"seed": 2})
    assert r.data[0].revised_prompt == "" and "did not steer" in r.model_extra["absorb_note"]
    cli(tmp_path, "generate", "-m", str(ROOT / "models/scenes"), "--seed", "2", "-o", "s.png")
    assert b64(r.data[0]) == (tmp_path / "s.png").read_bytes()
    # And back to the default bundle (one loaded at a time here).
    r = client.images.generate(prompt="4", extra_body={"seed": 2})
    cli(tmp_path, "generate", "-m", MODEL, "--seed", "2", "--class", "4", "-o", "d.png")
    assert b64(r.data[0]) == (tmp_path / "d.png").read_bytes()


def test_models_are_listed_and_retrieved(client):
    ids = [m.id for m in client.models.list()]
    assert ids[:2] == ["digits", "scenes"], ids
    m = client.models.retrieve("digits")
    assert m.owned_by == "absorb" and m.model_extra["absorb"]["classes"] == [str(d) for d in range(10)]
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("dall-e-2")
    assert e.value.body["code"] == "model_not_found"


def test_errors_come_in_openais_shape_naming_the_parameter(client):
    cases = [
        (dict(prompt="a cat"), "prompt", "one of: 0, 1, 2"),
        (dict(prompt="7", model="dall-e-3"), "model", "not a model of this service"),
        (dict(prompt="7", size="1024x1024"), "size", "32x32"),
        (dict(prompt="7", response_format="url"), "response_format", "b64_json"),
        (dict(prompt="7", style="vivid"), "style", "no styles"),
        (dict(prompt="7", n=99), "n", "out of range"),
        (dict(prompt="7", extra_body={"steps": 0}), "steps", "out of range"),
    ]
    for kwargs, param, needle in cases:
        with pytest.raises(openai.APIStatusError) as e:
            client.images.generate(**kwargs)
        err = e.value.body
        assert e.value.status_code in (400, 404), (kwargs, e.value.status_code)
        assert err["param"] == param and needle in err["message"], (kwargs, err)
        assert err["type"] == "invalid_request_error", err
    # An edit without a mask reads the image's own alpha: an opaque image has none to regenerate.
    opaque = png(32, 32, lambda x, y: (9, 9, 9, 255))
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=("o.png", io.BytesIO(opaque), "image/png"), prompt="")
    assert e.value.body["param"] == "mask" and "fully transparent" in e.value.body["message"]
    # The service goes on.
    assert len(client.images.generate(prompt="1", extra_body={"seed": 1}).data) == 1


def raw(client, path, body, content_type):
    """A hand-made request (for bodies no client would send): (status, parsed JSON)."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(str(client.base_url).rstrip("/") + path, data=body, method="POST",
                                 headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def form(fields, boundary="absorbtest"):
    """multipart/form-data of (name, value, filename or None)."""
    out = b""
    for name, value, filename in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_malformed_requests_are_400s_in_openais_shape_and_the_service_goes_on(client):
    image = SOURCE.read_bytes()
    cases = [
        ("/images/generations", b"{", "application/json", "body", "malformed JSON"),
        ("/images/generations", b'{"prompt": "7", "colour": 1}', "application/json", "colour", "unknown field"),
        ("/images/edits", b'{"prompt": "7"}', "application/json", "body", "multipart/form-data"),
        ("/images/edits", *form([("prompt", b"7", None)]), "image", "missing field `image`"),
        ("/images/edits", *form([("image", b"not a png", "a.png"), ("prompt", b"", None)]), "image", "PNG"),
        ("/images/variations", *form([("image", image, "a.png"), ("colour", b"red", None)]), "body", "unknown field `colour`"),
        ("/images/variations", *form([("image", image, "a.png"), ("image", image, "b.png")]), "image", "more than once"),
        ("/images/variations", *form([("image", image, "a.png"), ("strength", b"2", None)]), "strength", "not in (0, 1]"),
        ("/images/variations", *form([("image", image, "a.png"), ("n", b"many", None)]), "n", "many"),
        ("/images/variations", b"--x\r\nbroken", "multipart/form-data; boundary=x", "body", "multipart"),
    ]
    for path, body, content_type, param, needle in cases:
        status, j = raw(client, path, body, content_type)
        assert status == 400, (path, body[:60], j)
        err = j["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param and needle in err["message"], \
            (path, body[:60], err)
    assert len(client.images.generate(prompt="2", extra_body={"seed": 2}).data) == 1
    # Parts are read by their field's name: an image sent without a filename, a number sent as a
    # file part, are what their field is.
    status, j = raw(client, "/images/variations",
                    *form([("image", image, None), ("seed", b"4", "seed.txt"), ("steps", b"8", None)]))
    assert status == 200, j
    want = client.images.create_variation(image=open(SOURCE, "rb"), extra_body={"seed": 4, "steps": 8})
    assert j["data"][0]["b64_json"] == want.data[0].b64_json and j["seed"] == 4
