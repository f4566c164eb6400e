"""The lookup-table text encoder of the digits model, as core/text_encoder.cc computes it.

A model directory's `text_encoder/` holds `config.json` (the vocabulary, max_tokens and the two
widths) and `model.safetensors` (`token_embedding [V, J]`, `pooled_embedding [V, P]`). Row 0 of
both is the empty prompt's: it pads txt_embed to max_tokens and is the pooled vector of "".

A prompt is split into words at ASCII whitespace and punctuation and lowercased (ASCII only);
every word must be in the vocabulary. txt_embed [max_tokens, J]: the words' rows, then row 0.
pooled_text [P]: the mean of the words' pooled rows (summed in order, float32), or row 0.
"""
import json
import os
import string

import numpy as np

SEPARATORS = set(string.whitespace) | set(string.punctuation)


def words(prompt):
    out, current = [], []
    for ch in prompt:
        if ch in SEPARATORS:
            if current:
                out.append("".join(current))
            current = []
        else:
            current.append(ch.lower() if ch.isascii() else ch)
    if current:
        out.append("".join(current))
    return out


def token_ids(prompt, vocabulary, max_tokens):
    """The vocabulary indices of the prompt's words; ValueError for an unknown word or too many."""
    index = {word: i for i, word in enumerate(vocabulary)}
    found = words(prompt)
    if len(found) > max_tokens:
        raise ValueError(f"prompt has {len(found)} words; the text encoder takes at most {max_tokens}")
    unknown = [w for w in found if w not in index or index[w] == 0]
    if unknown:
        raise ValueError(f"prompt word '{unknown[0]}' is not in the text encoder's vocabulary")
    return [index[w] for w in found]


class LookupTextEncoder:
    def __init__(self, directory):
        from safetensors_io import load  # noqa: E402 (training/ is on the path of its users)
        with open(os.path.join(directory, "config.json")) as f:
            self.config = json.load(f)
        tables = load(os.path.join(directory, "model.safetensors"))
        self.token_embedding = tables["token_embedding"]
        self.pooled_embedding = tables["pooled_embedding"]

    def encode(self, prompt):
        """(txt_embed [T, J], pooled_text [P]), float32."""
        ids = token_ids(prompt, self.config["vocabulary"], self.config["max_tokens"])
        rows = ids + [0] * (self.config["max_tokens"] - len(ids))
        txt = self.token_embedding[rows]
        if not ids:
            return txt, self.pooled_embedding[0].copy()
        pooled = self.pooled_embedding[ids[0]].copy()
        for i in ids[1:]:
            pooled += self.pooled_embedding[i]
        return txt, pooled / np.float32(len(ids))
