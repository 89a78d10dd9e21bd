"""Engine benchmark: the cost of each influencekit stage as a ratio to a plain forward+backward.

Every stage runs on the same GPT-2-shaped model (random init, float32, eval mode) and the same
synthetic token data, in the same process, interleaved: each round times every stage once with
a plain forward+backward run between any two stages, and each stage's ratio is its time over the
mean of the two baseline runs around it. The table reports medians over rounds. Ratios measured
side by side are what carry over to other machines; the seconds do not (this is meant to run on
shared, noisy hardware).

Stages:
    fwd+bwd               plain forward + backward (summed next-token NLL, weight gradients on,
                          zeroed after each batch): the denominator of every ratio
    capture + G_z         ``hooks.capture`` (modules="mlp") + ``hooks.per_sequence_grads``
    capture only          ``hooks.capture`` without forming G_z
    capture (sampled)     ``hooks.capture`` with labels sampled from the model (what fit uses)
    fit ekfac/kfac/diag   ``fit_factors(..., fisher="sampled")``
    eigh (A, S)           the float64 eigendecompositions inside a kfac/ekfac fit, alone
    score / score r=32    ``score`` of 8 queries against the dataset (gradients on the fly)

Usage:
    python benchmarks/engine.py                 # full run (about 7 minutes on 2 CPU cores)
    python benchmarks/engine.py --quick         # smoke run, small model, well under 30 s
    python benchmarks/engine.py --device cuda --repeats 5 --threads 4
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import influencekit as ik
from influencekit.data import Batch, example_batches, length_order
from influencekit.hooks import capture, per_sequence_grads
from influencekit.models import select_modules
from influencekit.tiny import build_tokenizer

MODULES = "mlp"
N_QUERIES = 8
QUERY_RANK = 32


@dataclass(frozen=True)
class Setting:
    """Model shape and data size of one benchmark size."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    n_positions: int
    n_sequences: int
    max_length: int
    batch_size: int


FULL = Setting(
    n_layer=6,
    n_embd=384,
    n_head=6,
    vocab_size=8192,
    n_positions=256,
    n_sequences=96,
    max_length=128,
    batch_size=8,
)
QUICK = Setting(
    n_layer=2,
    n_embd=128,
    n_head=4,
    vocab_size=2048,
    n_positions=128,
    n_sequences=24,
    max_length=64,
    batch_size=8,
)


# ---------------------------------------------------------------------------------------------
# Model and data


def synthetic_texts(n: int, seed: int) -> list[str]:
    """``n`` English-looking paragraphs of varied length over a Zipf-distributed vocabulary.

    Words are built from syllables so that a BPE tokenizer learns a realistic mix of whole
    words and word pieces; lengths vary from a sentence to several, so batches carry padding.
    """
    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ou", "ea")]
    lexicon = sorted({"".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(6000)})
    weights = 1.0 / np.arange(1, len(lexicon) + 1) ** 1.1
    weights /= weights.sum()
    texts = []
    for _ in range(n):
        sentences = []
        for _ in range(int(rng.integers(2, 16))):
            words = list(rng.choice(lexicon, size=int(rng.integers(4, 16)), p=weights))
            words[0] = words[0].capitalize()
            if rng.random() < 0.3:
                words.insert(int(rng.integers(1, len(words))), f"{rng.integers(1, 2000)},")
            sentences.append(" ".join(words) + str(rng.choice([".", ".", ".", "?", "!"])))
        texts.append(" ".join(sentences))
    return texts


def build_model(s: Setting, device: torch.device) -> GPT2LMHeadModel:
    config = GPT2Config(
        n_layer=s.n_layer,
        n_embd=s.n_embd,
        n_head=s.n_head,
        vocab_size=s.vocab_size,
        n_positions=s.n_positions,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(device=device, dtype=torch.float32).eval()


def build_data(s: Setting) -> tuple[ik.TextDataset, list[tuple[str, str]]]:
    """A training set of ``s.n_sequences`` texts (truncated to ``s.max_length`` tokens) and
    ``N_QUERIES`` (prompt, completion) pairs, tokenized by a BPE tokenizer trained on the spot."""
    corpus = synthetic_texts(4 * s.n_sequences, seed=0)
    tokenizer = build_tokenizer(corpus, vocab_size=s.vocab_size)
    if len(tokenizer) > s.vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens > vocab {s.vocab_size}")
    train = ik.TextDataset.from_texts(corpus[: s.n_sequences], tokenizer, s.max_length)
    queries = []
    for text in synthetic_texts(N_QUERIES, seed=1):
        words = text.split()
        queries.append((" ".join(words[:8]), " " + " ".join(words[8:14])))
    return train, queries


# ---------------------------------------------------------------------------------------------
# Stages: each is a zero-argument function that does the whole stage once


def plain_forward_backward(model: torch.nn.Module, batches: list[Batch]) -> None:
    """The baseline: what one training step costs without the optimizer update."""
    for batch in batches:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        labels = batch.input_ids.roll(-1, dims=1).masked_fill(~batch.label_mask, -100)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        loss.backward()
        model.zero_grad(set_to_none=True)


def capture_stage(model, layers, batches: list[Batch], *, form_grads: bool, targets: str) -> None:
    for batch in batches:
        io = capture(model, layers, batch, targets=targets)
        if form_grads:
            for x in io.values():
                per_sequence_grads(x)


def covariances(factors: ik.Factors) -> list[torch.Tensor]:
    """Every layer's float64 A and S, rebuilt from fitted factors as ``Q diag(D) Qᵀ``."""
    return [
        (q * d) @ q.T
        for lf in factors.layers.values()
        for q, d in ((lf.q_a, lf.d_a), (lf.q_s, lf.d_s))
    ]


def eigh_stage(matrices: list[torch.Tensor]) -> None:
    """The float64 eigendecompositions a kfac/ekfac fit ends with, alone."""
    for m in matrices:
        torch.linalg.eigh(m)


def warm_up(model, layers, batches: list[Batch], factors, train, queries) -> None:
    """Run each code path once on a little data, so first-call costs stay out of the timings."""
    plain_forward_backward(model, batches)
    for targets in ("real", "sampled"):
        capture_stage(model, layers, batches, form_grads=True, targets=targets)
    for rank in (None, QUERY_RANK):
        ik.score(model, factors, queries, train, query_rank=rank, progress=False)


def make_stages(model, train, queries, s: Setting, device) -> list[tuple[str, Callable, str]]:
    """``(label, function, target)`` for every stage; target is like "<= 1.3x" or ""."""
    layers = select_modules(model, MODULES)
    # The same batches the kit forms (longest first), so every stage does the same padded work.
    batches = [b.to(device) for b in example_batches(train, s.batch_size, length_order(train))]
    # Factors for scoring and for the eigh stage: cost does not depend on how well they fit.
    factors = ik.fit_factors(model, train, MODULES, max_examples=2 * s.batch_size, progress=False)
    warm_up(model, layers, batches[:2], factors, train[: 2 * s.batch_size], queries)
    matrices = covariances(factors)
    fit_opts = {"fisher": "sampled", "batch_size": s.batch_size, "progress": False}
    score_opts = {"batch_size": s.batch_size, "progress": False}

    def fit(strategy: str) -> Callable:
        return lambda: ik.fit_factors(model, train, MODULES, strategy=strategy, **fit_opts)

    def scoring(rank: int | None) -> Callable:
        return lambda: ik.score(model, factors, queries, train, query_rank=rank, **score_opts)

    def captured(form_grads: bool, targets: str) -> Callable:
        opts = {"form_grads": form_grads, "targets": targets}
        return lambda: capture_stage(model, layers, batches, **opts)

    return [
        ("fwd+bwd (baseline)", lambda: plain_forward_backward(model, batches), ""),
        ("capture + G_z", captured(True, "real"), "<= 1.3x"),
        ("capture only", captured(False, "real"), ""),
        ("capture (sampled labels)", captured(False, "sampled"), ""),
        ("fit ekfac (sampled)", fit("ekfac"), "<= 3x"),
        ("fit kfac (sampled)", fit("kfac"), ""),
        ("fit diagonal (sampled)", fit("diagonal"), ""),
        ("  of which eigh (A, S)", lambda: eigh_stage(matrices), ""),
        (f"score {N_QUERIES} queries", scoring(None), ""),
        (f"score {N_QUERIES} queries, rank {QUERY_RANK}", scoring(QUERY_RANK), ""),
    ]


# ---------------------------------------------------------------------------------------------
# Timing and report


def timed(fn: Callable, device: torch.device) -> float:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


Timings = dict[str, list[tuple[float, float]]]  # stage -> [(seconds, ratio to fwd+bwd)]


def run_rounds(stages, repeats: int, device: torch.device) -> Timings:
    """Time every stage once per round, ``repeats`` rounds, a baseline between any two stages.

    The order is ``B S1 B S2 B .. Sn B S1 B ..``: each stage is compared with the mean of the
    baseline runs just before and just after it, so a change in machine load (another job
    starting or ending) lands on numerator and denominator alike.
    """
    (base_label, base_fn, _), others = stages[0], stages[1:]
    base = [timed(base_fn, device)]
    timings: Timings = {label: [] for label, _, _ in others}
    for r in range(repeats):
        for label, fn, _ in others:
            seconds = timed(fn, device)
            base.append(timed(base_fn, device))
            timings[label].append((seconds, seconds / statistics.mean(base[-2:])))
        runs = base[-len(others) - 1 :]
        print(f"  round {r + 1}/{repeats}: fwd+bwd {min(runs):.2f}-{max(runs):.2f} s", flush=True)
    timings[base_label] = [(t, 1.0) for t in base]
    return timings


def add_fit_without_eigh(stages, timings: Timings):
    """A derived row: the ekfac fit minus the eigendecompositions timed in the same round.

    The eigh cost is fixed per fit (it depends on layer widths, not on the data), while the two
    passes grow with the data: this row is what the fit tends to on a large training set.
    """
    fit = next(label for label, _, _ in stages if label.startswith("fit ekfac"))
    eigh = next(label for label, _, _ in stages if "eigh" in label)
    label = "  fit ekfac minus eigh (derived)"
    timings[label] = [
        (fs - es, fr - er) for (fs, fr), (es, er) in zip(timings[fit], timings[eigh], strict=True)
    ]
    at = next(i for i, (lab, _, _) in enumerate(stages) if lab == eigh) + 1
    return [*stages[:at], (label, None, ""), *stages[at:]], timings


def check(ratio: float, target: str) -> str:
    if not target:
        return "-"
    return "pass" if ratio <= float(target.removeprefix("<=").strip().removesuffix("x")) else "FAIL"


def report(stages, timings: Timings) -> None:
    header = f"{'stage':<34} {'seconds':>8} {'spread':>7} {'x fwd+bwd':>10} {'target':>8}  result"
    print(header)
    print("-" * len(header))
    for label, _, target in stages:
        seconds = [t for t, _ in timings[label]]
        ratio = statistics.median(r for _, r in timings[label])
        middle = statistics.median(seconds)
        spread = (max(seconds) - min(seconds)) / middle
        print(
            f"{label:<34} {middle:8.2f} {spread:6.0%} {ratio:9.2f}x "
            f"{target or '-':>8}  {check(ratio, target)}"
        )
    print(
        "\nseconds: median over rounds; spread: (max - min) / median; x fwd+bwd: median over "
        "rounds of (stage time / mean of the fwd+bwd runs just before and just after it)."
    )


def describe(model, train, s: Setting, device, threads: int, repeats: int) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    layers = select_modules(model, MODULES)
    n_tracked = sum(layer.module.weight.numel() for layer in layers)
    order = length_order(train)
    padded = sum(b.input_ids.numel() for b in example_batches(train, s.batch_size, order))
    lengths = [len(ex.input_ids) for ex in train]
    print(
        f"torch {torch.__version__} | python {platform.python_version()} | device {device}"
        f" | threads {threads} | repeats {repeats}\n"
        f"model: GPT-2 n_layer={s.n_layer} n_embd={s.n_embd} n_head={s.n_head} "
        f"vocab={s.vocab_size}, {n_params / 1e6:.1f}M params, float32, eval; tracked "
        f"'{MODULES}': {n_tracked / 1e6:.1f}M weights in {len(layers)} layers\n"
        f"data: {len(train)} sequences, {train.n_tokens} tokens (lengths {min(lengths)}-"
        f"{max(lengths)}, {padded} positions after padding), batch size {s.batch_size}; "
        f"{N_QUERIES} queries\n",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model and data (smoke run)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median is kept)")
    parser.add_argument(
        "--sequences",
        type=int,
        default=None,
        help="training sequences (default 96; 24 with --quick): the fixed eigh cost of a fit "
        "weighs less as this grows",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's current setting)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    os.environ["INFLUENCEKIT_PROGRESS"] = "0"  # belt and braces: every call passes progress=False
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    setting = QUICK if args.quick else FULL
    if args.sequences is not None:
        setting = dataclasses.replace(setting, n_sequences=args.sequences)

    train, queries = build_data(setting)
    model = build_model(setting, device)
    describe(model, train, setting, device, threads, args.repeats)
    stages = make_stages(model, train, queries, setting, device)
    timings = run_rounds(stages, args.repeats, device)
    stages, timings = add_fit_without_eigh(stages, timings)
    print()
    report(stages, timings)


if __name__ == "__main__":
    main()


def store_options(name: str) -> dict:
    """Build options of a benchmark row: ``default`` (no option: the kit's choice),
    ``budget:128KiB`` (a byte budget), ``CODEC@DTYPE`` (e.g. ``sparse:4096@float16``), or a
    codec string (stored in float32).

    Example:
        >>> store_options("sparse:4096@float16")
        {'codec': 'sparse:4096', 'dtype': 'float16'}
    """
    if name == "default":
        return {}
    if name.startswith("budget:"):
        return {"budget": name.split(":", 1)[1]}
    codec, _, dtype = name.partition("@")
    return {"codec": codec, "dtype": dtype or "float32"}
