"""Answer time against an independent implementation that recomputes training gradients.

The kit answers a new batch of queries from its default gradient store (``ik.score`` with
the store, query gradients and preconditioning included); an independent EK-FAC
implementation, Kronfluence (``compute_pairwise_scores``), answers the same queries by
recomputing every training sequence's gradient. Both run in this process, one after the
other, on one thread, so the ratio of the two times is taken in the same run; the kit's own
on-the-fly scores (``ik.score`` with the ``TextDataset``) are timed beside them. Factors
(each implementation its own) and the store are built before any timing.

Printed: the three times, the ratios, the store's codecs and bytes, and Pearson of the store
and of Kronfluence against the kit's exact scores (the two EK-FAC fits and dampings differ,
so the latter is a check that the same thing is computed, not a target). The last line is
one JSON object.

Needs Kronfluence, which the kit does not depend on (``pip install kronfluence``; it must
import beside the kit's torch), and a model folder written by benchmarks/wide_model.py.

Usage:
    python benchmarks/independent.py --model ~/.cache/influencekit/narrow-model --sequences 1200
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/ is not a package

import influencekit as ik
from store import load_wide, pearsons

QUIET = {"progress": False}
BATCH = 8


def padded(rows: list[tuple[list[int], int]], pad: int) -> list[dict[str, torch.Tensor]]:
    """Examples as Kronfluence's default collation takes them: ``input_ids``,
    ``attention_mask`` and ``labels`` (-100 where not scored: padding, and a query's prompt),
    all padded to the longest."""
    width = max(len(ids) for ids, _ in rows)
    out = []
    for ids, first_scored in rows:
        n = len(ids)
        input_ids = torch.full((width,), pad, dtype=torch.long)
        input_ids[:n] = torch.tensor(ids)
        mask = torch.zeros(width, dtype=torch.long)
        mask[:n] = 1
        labels = torch.full((width,), -100, dtype=torch.long)
        labels[first_scored:n] = input_ids[first_scored:n]
        out.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return out


def summed_loss(model, batch) -> torch.Tensor:
    """``Σ −log p(x_{t+1} | x_≤t)`` over the scored next tokens of the batch (the kit's loss)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def kronfluence_scores(model, modules, train_rows, query_rows, pad, root: Path):
    """Kronfluence's EK-FAC pairwise scores ``(Q, N)`` and the seconds of the scoring call
    alone (its factors fitted first, untimed)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class LanguageModelTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            if not sample:
                return summed_loss(model, batch)
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            with torch.no_grad():  # the sampled (true) Fisher: targets drawn from the model
                drawn = torch.distributions.Categorical(logits=logits[:, :-1].float()).sample()
            keep = batch["labels"][:, 1:] != -100
            return torch.nn.functional.cross_entropy(
                logits[:, :-1][keep].float(), drawn[keep], reduction="sum"
            )

        def compute_measurement(self, batch, model):
            return summed_loss(model, batch)

        def get_influence_tracked_modules(self):
            return list(modules)

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    task = LanguageModelTask()
    model = prepare_model(model, task)
    analyzer = Analyzer("independent", model, task, cpu=True, disable_tqdm=True,
                        output_dir=str(root))  # fmt: skip
    train = padded(train_rows, pad)
    queries = padded(query_rows, pad)
    fit = FactorArguments(strategy="ekfac")
    analyzer.fit_all_factors("ekfac", train, per_device_batch_size=BATCH, factor_args=fit,
                             overwrite_output_dir=True)  # fmt: skip
    start = time.perf_counter()
    analyzer.compute_pairwise_scores(
        "scores", "ekfac", queries, train, per_device_query_batch_size=len(queries),
        per_device_train_batch_size=BATCH, score_args=ScoreArguments(damping_factor=None),
        overwrite_output_dir=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    found = analyzer.load_pairwise_scores("scores")["all_modules"]
    return found.double().numpy(), seconds


def timed(call):
    start = time.perf_counter()
    out = call()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="benchmarks/wide_model.py folder")
    parser.add_argument("--sequences", type=int, default=1200)
    parser.add_argument("--store", type=Path, default=None, help="keep (or reuse) the store")
    parser.add_argument("--factors", type=Path, default=None, help="keep (or reuse) factors")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, train, queries = load_wide(args.model, args.sequences, torch.device("cpu"))
    tokenizer = train.tokenizer
    if args.factors is not None and args.factors.is_file():
        factors = ik.Factors.load(args.factors)
    else:
        factors = ik.fit_factors(model, train, "mlp", **QUIET)
        if args.factors is not None:
            factors.save(args.factors)
    scratch = Path(tempfile.mkdtemp(prefix="independent-"))
    path = args.store or scratch / "grads.h5"
    store = ik.GradientStore.build(path, model, train, factors=factors, **QUIET)
    print(f"{len(train)} sequences, {len(queries)} queries; store {store.codec} "
          f"{store.bytes_per_example():,} bytes/sequence", flush=True)  # fmt: skip
    ik.score(model, factors, queries, store, **QUIET)  # warm the page cache and the code
    t_store, from_store = timed(lambda: ik.score(model, factors, queries, store, **QUIET))
    t_fly, exact = timed(lambda: ik.score(model, factors, queries, train, **QUIET))
    t_store2, _ = timed(lambda: ik.score(model, factors, queries, store, **QUIET))
    t_store = min(t_store, t_store2)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_rows = [(list(map(int, ex.input_ids)), 0) for ex in train]
    query_rows = [q.encode(tokenizer) for q in ik.as_queries(queries)]
    modules = [layer.name for layer in factors.tracked_layers(model)]
    independent, t_independent = kronfluence_scores(
        model, modules, train_rows, query_rows, pad, scratch / "kronfluence"
    )
    found = {
        "sequences": len(train),
        "queries": len(queries),
        "codecs": store.layer_codecs,
        "bytes_per_sequence": store.bytes_per_example(),
        "seconds": {"store": t_store, "fly": t_fly, "kronfluence": t_independent},
        "answer_vs_kronfluence": t_independent / t_store,
        "answer_vs_fly": t_fly / t_store,
        "pearson_store_vs_exact": float(np.mean(pearsons(from_store.scores, exact.scores))),
        "pearson_kronfluence_vs_exact": float(np.mean(pearsons(independent, exact.scores))),
    }
    print(f"store {t_store:.1f} s, kit on the fly {t_fly:.1f} s, Kronfluence {t_independent:.1f} s:"
          f" the store answers {found['answer_vs_kronfluence']:.1f}x faster than Kronfluence "
          f"recomputing, {found['answer_vs_fly']:.1f}x faster than the kit on the fly")  # fmt: skip
    print(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
