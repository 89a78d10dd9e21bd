"""Throughput of fit, store build and scoring on a GPT-2-small-shaped model, on a GPU.

One random-init GPT-2 of GPT-2 small's shape (12 blocks, width 768, MLP 3072, 124M
parameters) and synthetic 128-token sequences (benchmarks/engine.py). Each stage is timed
once after a warm-up pass, with a plain forward+backward over the same batches timed just
before it; printed: sequences per second and the ratio to that forward+backward.

Stages: ``fit`` (EK-FAC factors of the 24 MLP layers, two passes), ``build`` (the default
store with factors, ``sparse8``, fidelity probe included), ``score store`` (8 queries from
the store, query gradients included) and ``score on the fly`` (the same 8 queries, training
gradients recomputed). Also printed: the largest covariance's eigendecomposition on the
device against the host (``eigh``), which decides fit time at large widths.

Usage:
    python benchmarks/gpu.py                    # cuda if visible, GPT-2 small, 512 sequences
    python benchmarks/gpu.py --bf16             # the same under bf16 autocast
    python benchmarks/gpu.py --quick            # a small model on whatever device: smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/ is not a package

from engine import QUICK, Setting, build_data, build_model, plain_forward_backward, timed

import influencekit as ik
from influencekit.data import example_batches, length_order

GPT2_SMALL = Setting(
    n_layer=12,
    n_embd=768,
    n_head=12,
    vocab_size=8192,  # the synthetic corpus's tokenizer; the 50k table only adds head cost
    n_positions=256,
    n_sequences=512,
    max_length=128,
    batch_size=16,
)
QUIET = {"progress": False}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model (smoke run)")
    parser.add_argument("--sequences", type=int, default=None)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for every stage")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    setting = QUICK if args.quick else GPT2_SMALL
    if args.sequences:
        setting = dataclasses.replace(setting, n_sequences=args.sequences)
    device = torch.device(args.device)
    amp = {"amp_dtype": torch.bfloat16} if args.bf16 else {}
    model = build_model(setting, device)
    train, queries = build_data(setting)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} | {name} | bf16 autocast: {args.bf16}")
    print(f"model: GPT-2 {setting.n_layer} x {setting.n_embd}, {n_params:.0f}M params; "
          f"{len(train)} sequences of <= {setting.max_length} tokens")  # fmt: skip
    batches = [
        b.to(device) for b in example_batches(train, setting.batch_size, length_order(train))
    ]

    def baseline() -> float:
        if args.bf16:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return timed(lambda: plain_forward_backward(model, batches), device)
        return timed(lambda: plain_forward_backward(model, batches), device)

    baseline()  # warm-up: kernels, allocator
    run = {"batch_size": setting.batch_size, **amp, **QUIET}
    rows = []
    with tempfile.TemporaryDirectory() as root:
        factors = None

        def fit():
            nonlocal factors
            factors = ik.fit_factors(model, train, "mlp", **run)

        def build():
            ik.GradientStore.build(Path(root) / "s.h5", model, train, factors=factors, **run)

        stages = [
            ("fit", fit),
            ("build", build),
            ("score store", lambda: ik.score(model, factors, queries, store(root), **run)),
            ("score on the fly", lambda: ik.score(model, factors, queries, train, **run)),
        ]
        for stage, fn in stages:
            base = baseline()
            seconds = timed(fn, device)
            rows.append((stage, len(train) / seconds, seconds / base))
        biggest = max((lf.q_s for lf in factors.layers.values()), key=lambda q: q.shape[0]).shape[0]
    print(f"\n{'stage':<18} {'sequences/s':>12} {'x fwd+bwd':>10}")
    for stage, rate, ratio in rows:
        print(f"{stage:<18} {rate:>12.1f} {ratio:>9.2f}x")
    x = torch.randn(biggest, biggest, dtype=torch.float64, device=device)
    x = x @ x.T
    on_device = timed(lambda: torch.linalg.eigh(x), device)
    on_host = timed(lambda: torch.linalg.eigh(x.cpu()), torch.device("cpu"))
    print(f"\neigh of a {biggest} x {biggest} float64 covariance: {on_device:.2f} s on "
          f"{device.type}, {on_host:.2f} s on the host ({on_host / on_device:.1f}x)")  # fmt: skip


def store(root: str) -> ik.GradientStore:
    return ik.GradientStore.open(Path(root) / "s.h5")


if __name__ == "__main__":
    main()
