"""The transformer graph's inputs as onnxruntime takes them (no torch here: reference.py's peers
import this without it).

A class-conditional transformer (model.PriorConfig.n_classes > 0) has a second input, `class`: one
id per row, -1 for "no class". The names are the contract with src/graphs/mod.rs."""

import numpy as np

TRANSFORMER_INPUT = "tokens"
CLASS_INPUT = "class"
NO_CLASS = -1


def is_conditional(session) -> bool:
    """The graph of `session` (an onnxruntime.InferenceSession) takes a class per row."""
    return CLASS_INPUT in {i.name for i in session.get_inputs()}


def transformer_feed(session, tokens, classes=None) -> dict:
    """The inputs of one transformer call: tokens (R, L) int64; for a conditional graph also the
    class of each row (None: no class for any row). An unconditional graph refuses classes."""
    feed = {TRANSFORMER_INPUT: tokens}
    if is_conditional(session):
        feed[CLASS_INPUT] = (np.full(len(tokens), NO_CLASS, np.int64) if classes is None
                             else np.asarray(classes, np.int64).reshape(len(tokens)))
    elif classes is not None:
        raise ValueError("this transformer graph has no class input")
    return feed
