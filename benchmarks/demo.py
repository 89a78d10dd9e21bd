"""What the demo finds, small model against large: per query, where its source quote ranks and
how much of its top 10 comes from its own theme; plus each run's stage timings.

Runs (or reuses, by stage key) ``influencekit demo`` for both shipped sizes.

Usage:
    python benchmarks/demo.py                   # whole corpus, both sizes (a few minutes)
    python benchmarks/demo.py --quick           # the --quick slice
    python benchmarks/demo.py --out runs/demo   # where the two runs are kept (reused next time)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from transformers.utils import logging as hf_logging

from influencekit.demo.pipeline import TOP_K, run_demo, source_ranks, top_theme_share


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks-demo"))
    args = parser.parse_args(argv)
    os.environ["INFLUENCEKIT_PROGRESS"] = "0"
    hf_logging.disable_progress_bar()
    runs = {
        size: run_demo(args.out / size, quick=args.quick, size=size, log=lambda _: None)
        for size in ("small", "large")
    }
    ranks = {size: source_ranks(run) for size, run in runs.items()}
    n = len(runs["small"].train)
    print(f"{n} training sequences; source rank of {n}; on-theme = share of the top {TOP_K}")
    print(
        f"{'query':<16}{'kind':<11}{'rank small':>11}{'rank large':>11}"
        f"{'on-theme small':>16}{'on-theme large':>16}"
    )
    for q, query in enumerate(runs["small"].queries):
        r = [str(ranks[s].get(query["id"], "–")) for s in runs]
        t = [f"{top_theme_share(run, q):.0%}" for run in runs.values()]
        print(f"{query['id']:<16}{query['kind']:<11}{r[0]:>11}{r[1]:>11}{t[0]:>16}{t[1]:>16}")
    for kind in ("fact", "paraphrase", "flip", "cross"):
        qs = [q for q, query in enumerate(runs["small"].queries) if query["kind"] == kind]
        line = f"mean over {kind:<10} ({len(qs):>2} queries):"
        for size, run in runs.items():
            ids = [run.queries[q]["id"] for q in qs if run.queries[q]["id"] in ranks[size]]
            ranked = [ranks[size][i] for i in ids]
            theme = np.mean([top_theme_share(run, q) for q in qs])
            found = (
                f"source at rank 1 in {sum(r == 1 for r in ranked)}/{len(ranked)} "
                f"(median rank {np.median(ranked):.0f}), "
                if ranked
                else ""
            )
            line += f"  {size}: {found}on-theme {theme:.0%};"
        print(line)
    for size, run in runs.items():
        params = sum(p.numel() for p in _model_params(run))
        timings = ", ".join(f"{k} {v:.1f} s" for k, v in run.seconds.items())
        print(f"{size} ({params:,} parameters): {timings}; reused: {run.reused or 'none'}")


def _model_params(run):
    from influencekit.demo import load_demo_model

    model, _ = load_demo_model(run.size, device="cpu")
    return list(model.parameters())


if __name__ == "__main__":
    main()
