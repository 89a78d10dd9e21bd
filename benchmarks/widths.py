"""Real widths: fit, build and score on Llama-3.2-1B-shaped models, each stage in a process
of its own, with its time and peak memory.

The models have Llama-3.2-1B's width (hidden 2048, MLP 8192, 32 heads, 8 KV heads, tied
embeddings) and 1 or 2 blocks (or ``--blocks``), random weights (seeded), float32; the
training set is 16 texts of consecutive quotes of the shipped corpus cut to 128 tokens of
the tiny tokenizer (``--sequences``), and 4 queries. ``modules="mlp"``: 3 layers per
block (8192 x 2048, 8192 x 2048, 2048 x 8192).

Each stage runs in a fresh process: it builds the model, reads ``VmRSS`` once the model is
loaded, resets the peak (``/proc/self/clear_refs``), runs the stage as the README calls it
(with ``max_memory`` where the setting gives one) and reads the peak ``VmHWM``. Stages:
``fit`` (``fit_factors``; written with ``path=`` under a memory budget, else ``save``),
``build`` (``GradientStore.build(..., factors=)``, the default codec chosen on the probe;
a plain forward and backward over the same batches is timed in the same process for the
ratio), ``store`` (``score`` from the store) and ``fly`` (``score`` on the fly).

Printed per model and setting: time, peak RSS and working memory (peak minus the RSS once
the model is loaded) per stage, the factors file, the store's bytes per sequence on disk and
its codecs; then the growth per block (2 blocks minus 1) of every stage's peak RSS, and the
scores under the memory budget against the defaults' (Pearson). The last line is one JSON
object with all of it.

Usage:
    python benchmarks/scaling.py --probe 1b                 # 1 and 2 blocks (about an hour)
    python benchmarks/widths.py --blocks 1,2 --settings default,2GiB
    python benchmarks/widths.py --blocks 16 --vocab 128256 --settings 6GiB --sequences 16
                                                            # the 1.2B model (hours)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREADS = 2
HIDDEN, MLP, HEADS, KV_HEADS = 2048, 8192, 32, 8
STAGES = ("fit", "build", "store", "fly")


def rss_kib(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process, in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Make ``VmHWM`` start again from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def model_and_data(blocks: int, vocab: int, sequences: int):
    import torch
    import transformers as tf

    import influencekit as ik
    from influencekit.demo.corpus import load_records
    from influencekit.tiny import TINY_CORPUS, build_tokenizer

    quotes = [r["text"] for r in load_records()]
    texts, current = [], ""
    for quote in quotes:  # consecutive quotes joined: each text runs past 128 tokens
        current = f"{current} {quote}".strip()
        if len(current) > 700:
            texts.append(current)
            current = ""
        if len(texts) == sequences + 8:
            break
    tokenizer = build_tokenizer(TINY_CORPUS + quotes[:400])
    train = ik.TextDataset.from_texts(texts[:sequences], tokenizer, max_length=128)
    queries = [(t[:60], t[60:120]) for t in texts[sequences : sequences + 4]]
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=max(vocab, len(tokenizer)),
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=blocks,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    with torch.device("cpu"):
        model = tf.LlamaForCausalLM(config).eval()
    return model, train, queries


def stage(kind: str, folder: Path, blocks: int, vocab: int, sequences: int, max_memory):
    """Run one stage here; return its figures."""
    import numpy as np
    import torch

    import influencekit as ik

    torch.set_num_threads(THREADS)
    model, train, queries = model_and_data(blocks, vocab, sequences)
    loaded = rss_kib("VmRSS")
    reset_peak()
    started = time.perf_counter()
    out = {"stage": kind}
    factors_path = folder / "factors.h5"
    if kind == "fit":
        if max_memory is None:  # the README's calls
            factors = ik.fit_factors(model, train, "mlp", progress=False)
            factors.save(factors_path)
        else:
            ik.fit_factors(model, train, "mlp", progress=False, max_memory=max_memory,
                           path=factors_path)  # fmt: skip
        out["factors_bytes"] = factors_path.stat().st_size
    elif kind == "build":
        factors = ik.Factors.load(factors_path)
        store = ik.GradientStore.build(folder / "grads.h5", model, train, factors=factors,
                                       progress=False, max_memory=max_memory)  # fmt: skip
        out["bytes_per_sequence"] = store.bytes_per_example()
        parts = sum(part.stat().st_size for part in store.part_paths())
        out["parts_bytes_per_sequence"] = round(parts / len(store))
        out["manifest_bytes"] = store.path.stat().st_size
        out["codecs"] = store.layer_codecs
        out["fidelity"] = None if store.fidelity is None else store.fidelity.pearson_mean
    else:
        factors = ik.Factors.load(factors_path)
        source = ik.GradientStore.open(folder / "grads.h5") if kind == "store" else train
        result = ik.score(model, factors, queries, source, progress=False, max_memory=max_memory)
        np.save(folder / f"scores-{kind}.npy", result.scores)
        out["layer_groups"] = result.meta["layer_groups"]
    out["seconds"] = time.perf_counter() - started
    out["peak_kib"] = rss_kib("VmHWM")
    out["loaded_kib"] = loaded
    if kind == "build":  # a plain forward and backward over the same batches, for the ratio
        from influencekit.data import example_batches, length_order

        sys.path.insert(0, str(Path(__file__).parent))
        from engine import plain_forward_backward

        batches = list(example_batches(train, 8, length_order(train)))
        tic = time.perf_counter()
        plain_forward_backward(model, batches)
        out["forward_backward_seconds"] = time.perf_counter() - tic
    return out


def run_stage(kind, folder, blocks, vocab, sequences, max_memory) -> dict:
    """One stage in a fresh process (its peak memory its own)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    args = [sys.executable, __file__, "--stage", kind, "--folder", str(folder)]
    args += ["--blocks", str(blocks), "--vocab", str(vocab), "--sequences", str(sequences)]
    if max_memory is not None:
        args += ["--max-memory", max_memory]
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"stage {kind} ({blocks} blocks, {max_memory}) failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


FIGURES = ("factors_bytes", "bytes_per_sequence", "parts_bytes_per_sequence", "manifest_bytes",
           "codecs", "fidelity", "layer_groups", "forward_backward_seconds")  # fmt: skip


def figures(row: dict) -> dict:
    """A stage's figures for the summary: time, peak, working memory and what it made."""
    found = {
        "seconds": round(row["seconds"], 1),
        "peak_gib": round(gib(row["peak_kib"]), 3),
        "working_gib": round(gib(row["peak_kib"] - row["loaded_kib"]), 3),
    }
    found.update({key: row[key] for key in FIGURES if key in row})
    if "forward_backward_seconds" in row:
        found["ratio"] = round(row["seconds"] / row["forward_backward_seconds"], 2)
    return found


def described(kind: str, row: dict) -> str:
    """One printed line of a stage."""
    extra = {k: v for k, v in figures(row).items() if k not in ("seconds", "peak_gib", "codecs")}
    return f"{kind:>5}: {row['seconds']:7.1f} s, peak {gib(row['peak_kib']):6.2f} GiB, {extra}"


def pearson(a, b) -> float:
    import numpy as np

    return float(min(np.corrcoef(x, y)[0, 1] for x, y in zip(a, b, strict=True)))


def gib(kib: float) -> float:
    return kib / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", default="1,2", help="models of these many blocks")
    parser.add_argument("--settings", default="default,2GiB", help="default and/or budgets")
    parser.add_argument("--vocab", type=int, default=0, help="vocabulary (default: the tiny one)")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--keep", default=None, help="folder to keep the files in")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--max-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:  # a worker: one stage, its figures as the last line
        blocks = int(args.blocks)
        found = stage(args.stage, Path(args.folder), blocks, args.vocab, args.sequences,
                      args.max_memory)  # fmt: skip
        print(json.dumps(found))
        return 0
    import numpy as np

    blocks_list = [int(b) for b in args.blocks.split(",")]
    settings = args.settings.split(",")
    results: dict = {}
    root = Path(args.keep or tempfile.mkdtemp(prefix="widths-"))
    print(f"files in {root}; {THREADS} threads; stages each in a process of its own", flush=True)
    for setting in settings:
        budget = None if setting == "default" else setting
        for blocks in blocks_list:
            folder = root / f"{setting}-{blocks}"
            folder.mkdir(parents=True, exist_ok=True)
            rows = {}
            for kind in STAGES:
                rows[kind] = run_stage(kind, folder, blocks, args.vocab, args.sequences, budget)
                print(f"{setting:>8} {blocks:>2} blocks " + described(kind, rows[kind]), flush=True)
            for kind in ("store", "fly"):
                rows[kind]["scores"] = np.load(folder / f"scores-{kind}.npy").tolist()
            results[(setting, blocks)] = rows
    summary = {"settings": settings, "blocks": blocks_list, "stages": {}}
    for (setting, blocks), rows in results.items():
        summary["stages"][f"{setting}/{blocks}"] = {
            "factors_gb_per_block": round(rows["fit"]["factors_bytes"] / blocks / 1e9, 3),
            "store_kib_per_block": round(
                rows["build"]["parts_bytes_per_sequence"] / blocks / 1024, 1
            ),
            **{kind: figures(row) for kind, row in rows.items()},
        }
    if len(blocks_list) >= 2:
        low, high = blocks_list[0], blocks_list[1]
        for setting in settings:
            growth = {
                kind: round(
                    gib(
                        results[(setting, high)][kind]["peak_kib"]
                        - results[(setting, low)][kind]["peak_kib"]
                    )
                    / (high - low),
                    3,
                )
                for kind in STAGES
            }
            summary[f"growth_gib_per_block/{setting}"] = growth
            print(f"{setting}: peak RSS growth per block (GiB): {growth}")
    if "default" in settings:
        for setting in settings:
            if setting == "default":
                continue
            for blocks in blocks_list:
                agree = {
                    kind: pearson(
                        results[("default", blocks)][kind]["scores"],
                        results[(setting, blocks)][kind]["scores"],
                    )
                    for kind in ("store", "fly")
                }
                summary[f"pearson_vs_default/{setting}/{blocks}"] = agree
                print(f"{setting}, {blocks} blocks: min Pearson against the defaults' {agree}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
