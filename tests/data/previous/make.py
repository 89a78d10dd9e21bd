"""Write the files of tests/data/previous with an earlier influencekit (run once, by hand).

A float32 tiny Llama (saved with its tokenizer), its EK-FAC factors file (float64, no
recorded damping or basis), and two gradient stores (``sparse8`` with paged positions in
the whole eigenbasis, ``lowrank:3``; two parts each) built from 12 sentences,
then the scores that version gave (on the fly and from each store) for two queries, all
written by the influencekit found on ``sys.path`` minus this checkout's editable install.
tests/test_compat.py opens them with the current version and checks it scores the same.

Run from a checkout of the earlier version (its folders mapped as the package):
    python tests/data/previous/make.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers as tf

TEXTS = [
    "The ship left the harbour at dawn with a crew of twelve.",
    "A storm rose over the sea and the sailors reefed the sails.",
    "The baker opened the oven and the smell of bread filled the street.",
    "Fresh loaves cooled on the rack while the baker swept the floor.",
    "The choir sang a slow hymn in the old stone church.",
    "The organist played the last chord and the church fell silent.",
    "Stars shine over the desert when the wind drops at night.",
    "The moon rose over the dunes and lit the sleeping camp.",
    "The chef tasted the soup and added a pinch of salt.",
    "A garden of herbs grew behind the kitchen of the inn.",
    "The lighthouse keeper climbed the stairs to light the lamp.",
    "Waves broke on the rocks below the lighthouse all night.",
]
QUERIES = [("The ship", " sailed over the sea."), ("The baker", " baked fresh bread.")]


def main(out: Path) -> None:
    import influencekit as ik
    from influencekit.tiny import build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(TEXTS)
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    model = tf.LlamaForCausalLM(config).eval()
    model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    model, tokenizer = ik.load_model(out / "model")
    train = ik.TextDataset.from_texts(TEXTS, tokenizer, max_length=24)
    factors = ik.fit_factors(model, train, "mlp", progress=False)
    factors.save(out / "factors.h5")
    factors = ik.Factors.load(out / "factors.h5")
    scores = {
        "version": ik.__version__,
        "fly": ik.score(model, factors, QUERIES, train, progress=False).layer_scores.tolist(),
    }
    for codec in ("sparse8:40", "lowrank:3"):
        name = codec.replace(":", "-")
        store = ik.GradientStore.build(
            out / f"{name}.h5",
            model,
            train,
            factors=factors,
            codec=codec,
            part_size=6,
            progress=False,
        )
        (out / f"{name}.h5.d" / "build.lock").unlink()
        scores[name] = ik.score(
            model, factors, QUERIES, store, progress=False
        ).layer_scores.tolist()
    (out / "scores.json").write_text(json.dumps(scores))


if __name__ == "__main__":
    for finder in list(sys.meta_path):  # not this checkout's editable install
        if "editable" in type(finder).__module__.lower() or "editable" in repr(finder).lower():
            sys.meta_path.remove(finder)
    main(Path(sys.argv[1]))
