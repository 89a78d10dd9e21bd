"""PBRF ground truth vs the kit's scores on the tiny GPT-2: one table of correlations.

For each strategy (ekfac, kfac, diagonal, identity) and each store codec (ekfac factors,
gradients read from a ``dense``, ``kron:K`` or ``lowrank:R`` store), the Pearson and Spearman
correlation of the kit's scores with PBRF responses (influencekit.validate.pbrf) and the
least-squares scale kit/PBRF, all with the same damping and modules.

Example:
    $ .venv/bin/python benchmarks/validate.py              # about 1 minute on 2 cores
    $ .venv/bin/python benchmarks/validate.py --n-train 12 --damping-scale 30
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import influencekit as ik
from influencekit.validate import compare, pbrf_scores

from tiny_example import QUERIES, corpus_records, train_tiny_model


def main(argv: list[str] | None = None) -> None:
    """Parse options, compute PBRF responses once, print one row per strategy and codec."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=6, help="training sequences scored")
    parser.add_argument("--n-queries", type=int, default=2)
    parser.add_argument(
        "--damping-scale", type=float, default=100.0,
        help="λ = this × mean of the default per-layer 0.1·mean(Λ) (small λ: slow PBRF solves)",
    )  # fmt: skip
    parser.add_argument("--epsilon", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=300, help="L-BFGS iterations at most")
    parser.add_argument("--codecs", default="dense,kron:16,lowrank:4")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = ik.load_model(train_tiny_model(Path(tmp) / "m"))
        train = ik.TextDataset.from_records(corpus_records(), tok, max_length=64)
        queries = QUERIES[: args.n_queries]
        # Spread over the four themes: every (40 / n)-th sentence.
        indices = np.linspace(0, len(train) - 1, args.n_train).round().astype(int).tolist()
        ekfac = ik.fit_factors(model, train, "mlp", progress=False)
        damping = args.damping_scale * float(np.mean(list(ekfac.damping_for(None).values())))
        print(
            f"tiny GPT-2 (2 blocks, d=64), modules=mlp, N={len(train)}, queries={args.n_queries}, "
            f"train indices={indices}\nλ={damping:.4g} (all layers), ε={args.epsilon}, "
            f"L-BFGS ≤{args.steps} iterations, float64"
        )
        start = time.perf_counter()
        truth, infos = pbrf_scores(
            model, train, queries, indices, damping=damping, epsilon=args.epsilon,
            symmetric=False, steps=args.steps, return_info=True,
        )  # fmt: skip
        worst = max(info.grad_ratio for pair in infos for info in pair)
        print(f"PBRF: {time.perf_counter() - start:.1f}s, worst ‖∇J‖ ratio {worst:.2e}\n")
        print(f"{'method':<22}{'pearson':>9}{'spearman':>10}{'scale':>8}")
        rows = []
        for strategy in ("ekfac", "kfac", "diagonal", "identity"):
            factors = ekfac if strategy == "ekfac" else ik.fit_factors(
                model, train, "mlp", strategy=strategy, progress=False
            )  # fmt: skip
            result = ik.score(model, factors, queries, train, damping=damping, progress=False)
            rows.append((strategy, result.scores[:, indices]))
        for codec in args.codecs.split(","):
            store = ik.GradientStore.build(
                Path(tmp) / f"{codec.replace(':', '_')}.h5", model, train, modules="mlp",
                codec=codec, progress=False,
            )  # fmt: skip
            result = ik.score(model, ekfac, queries, store, damping=damping, progress=False)
            rows.append((f"ekfac + store {codec}", result.scores[:, indices]))
        for name, kit in rows:
            stats = compare(kit, truth)["overall"]
            print(
                f"{name:<22}{stats['pearson']:>9.3f}{stats['spearman']:>10.3f}{stats['scale']:>8.2f}"
            )


if __name__ == "__main__":
    main()
