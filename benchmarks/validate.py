"""How well the kit's scores predict ground truth: PBRF and LDS tables, with their settings.

``--part pbrf`` (tiny GPT-2 of the tests, 2 blocks, d = 64, 40 sentences): Pearson and
Spearman correlation of the kit's scores with PBRF responses (influencekit.validate.pbrf) and
the least-squares scale kit/PBRF, for each strategy and store codec, with the same damping
and modules.

``--part lds`` (the validation setting, influencekit.validate.setting: a 2-block GPT-2 trained
from scratch on 256 quotes of the shipped corpus, 16 held-out queries): the linear
datamodeling score for each strategy, store codec, damping and multi-checkpoint
combination, against models retrained on random half-subsets with several seeds. The
retraining measurements are cached in ``kit/validate/data/lds_runs.h5`` (shipped): a rerun
with the same settings reuses them and takes about a minute; new settings retrain (about 3 s
per run on one core).

``--part metagradient`` (the validation setting): the LDS of the exact metagradient
(influencekit.validate.replay: the derivative of each query's log-probability at the end of
training with respect to each training sequence's weight, by replaying training backwards),
averaged over ``--replay-seeds`` training runs, beside EK-FAC at the final weights; the
last line is one JSON object (slow: about 25 minutes per replayed run on one core).

``--part exact``: the exact damped Gauss–Newton influence (the ε → 0 limit of PBRF,
influencekit.validate.exact, conjugate gradient) in the validation setting at the default
damping, against every method's scores over all 256 training sequences, multi-checkpoint
included (slow: about 20 minutes per query on one core).

Example:
    $ .venv/bin/python benchmarks/validate.py --part pbrf   # about 5 min
    $ .venv/bin/python benchmarks/validate.py --part lds    # about 1 min with the shipped cache
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

from engine import store_options

import influencekit as ik
from influencekit.validate import (
    SHIPPED_RUNS,
    Recipe,
    Retraining,
    checkpoint_results,
    combine_checkpoints,
    compare,
    exact_influence,
    lds,
    load_setting,
    lr_weights,
    metagradient_scores,
    pbrf_scores,
    random_subsets,
    replay_training,
    retrain,
)

from helpers.tiny_example import QUERIES, corpus_records, train_tiny_model

STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")


def method_scores(model, train, queries, ekfac, damping, codecs: str, tmp: Path) -> list:
    """``[(name, scores)]`` for every strategy (on the fly) and every codec (EK-FAC factors,
    gradients from a store), all with the same damping."""
    rows = []
    for strategy in STRATEGIES:
        factors = ekfac if strategy == "ekfac" else ik.fit_factors(
            model, train, "mlp", strategy=strategy, progress=False
        )  # fmt: skip
        result = ik.score(model, factors, queries, train, damping=damping, progress=False)
        rows.append((strategy, result.scores))
    for codec in codecs.split(","):
        # Same model, data and codec as an earlier call: the build finds the store complete.
        path = tmp / f"{len(train)}_{codec.replace(':', '_')}.h5"
        store = ik.GradientStore.build(
            path, model, train, modules="mlp", factors=ekfac, progress=False,
            **store_options(codec),
        )  # fmt: skip
        result = ik.score(model, ekfac, queries, store, damping=damping, progress=False)
        rows.append((f"ekfac + store {codec}", result.scores))
    return rows


def pbrf_table(args, tmp: Path) -> None:
    """PBRF responses on the tests' tiny GPT-2, once; one row per strategy and codec."""
    model, tok = ik.load_model(train_tiny_model(tmp / "m"))
    train = ik.TextDataset.from_records(corpus_records(), tok, max_length=64)
    queries = QUERIES[: args.n_queries]
    # Spread over the four themes: every (40 / n)-th sentence.
    indices = np.linspace(0, len(train) - 1, args.n_train).round().astype(int).tolist()
    ekfac = ik.fit_factors(model, train, "mlp", progress=False)
    damping = args.damping_scale * float(np.mean(list(ekfac.damping_for(None).values())))
    print(
        f"## PBRF: tiny GPT-2 (2 blocks, d=64), modules=mlp, N={len(train)}, "
        f"queries={args.n_queries}, train indices={indices}\nλ={damping:.4g} (all layers), "
        f"ε={args.epsilon}, L-BFGS ≤{args.steps} iterations, float64"
    )
    start = time.perf_counter()
    truth, infos = pbrf_scores(
        model, train, queries, indices, damping=damping, epsilon=args.epsilon,
        symmetric=False, steps=args.steps, return_info=True,
    )  # fmt: skip
    worst = max(info.grad_ratio for pair in infos for info in pair)
    print(f"PBRF: {time.perf_counter() - start:.1f}s, worst ‖∇J‖ ratio {worst:.2e}\n")
    rows = method_scores(model, train, queries, ekfac, damping, args.codecs, tmp)
    rows = [(name, scores[:, indices]) for name, scores in rows]
    # The exact damped GNH influence (no EK-FAC): PBRF's ε → 0 limit, so its row shows how
    # much of the gap is the PBRF solve and its ε, and how much the kit's approximation.
    exact = exact_influence(model, train, queries, damping=damping, factors=ekfac,
                            indices=indices)  # fmt: skip
    rows.insert(0, ("exact GNH (CG, no EK-FAC)", exact))
    print_comparison(rows, truth)
    # At the default damping L-BFGS does not converge on PBRF; CG on the exact GNH does.
    default = ekfac.damping_for(None)
    start = time.perf_counter()
    exact, infos = exact_influence(model, train, queries, damping=default, factors=ekfac,
                                   max_iter=5000, return_info=True)  # fmt: skip
    print(
        f"At the default damping (per layer {[round(v, 4) for v in default.values()]}), against "
        f"the exact GNH influence on all {len(train)} training sequences ({len(queries)} "
        f"queries; CG {[i.iterations for i in infos]} iterations, "
        f"{time.perf_counter() - start:.0f} s):"
    )
    print_comparison(method_scores(model, train, queries, ekfac, default, args.codecs, tmp), exact)


def print_comparison(rows: list, truth: np.ndarray) -> None:
    """One row per method: Pearson, Spearman and scale of its scores against ``truth``."""
    print(f"{'method':<34}{'pearson':>9}{'spearman':>10}{'scale':>8}")
    for name, kit in rows:
        stats = compare(kit, truth)["overall"]
        print(f"{name:<34}{stats['pearson']:>9.3f}{stats['spearman']:>10.3f}{stats['scale']:>8.2f}")
    print()


def lds_row(name: str, result, runs, baseline=None):
    """Print one LDS row (mean ± standard error over queries, quartiles); with ``baseline``
    (another row's LDS) also the paired difference over queries. Returns the LDS."""
    out = lds(result, runs)
    ok = np.isfinite(out.per_query)
    sem = out.per_query[ok].std(ddof=1) / np.sqrt(ok.sum())
    low, high = np.percentile(out.per_query[ok], [25, 75])
    line = f"{name:<34}{out.mean:>7.3f} ± {sem:.3f}   [{low:6.2f}, {high:5.2f}]"
    if baseline is not None:
        diff = out.per_query - baseline.per_query
        diff_sem = np.nanstd(diff, ddof=1) / np.sqrt(ok.sum())
        line += f"   vs final: {np.nanmean(diff):+.3f} ± {diff_sem:.3f}"
    print(line)
    return out


def lds_table(args, tmp: Path) -> None:
    """Retrain (or reuse the cache), then the LDS of every method on the same measurements."""
    setting, recipe = load_setting(), Recipe()
    train, queries = setting.train, setting.queries
    subsets = random_subsets(len(train), args.subsets, seed=args.subset_seed)
    seeds = list(range(args.seeds))
    print(
        f"## LDS: validation setting (influencekit.validate.setting): GPT-2 {recipe.n_layer} "
        f"blocks, d={recipe.n_embd}, vocab {len(setting.tokenizer)}, trained from scratch "
        f"{recipe.epochs} epochs\nN={len(train)} quotes ({train.n_tokens} tokens), "
        f"{len(queries)} held-out queries, {args.subsets} half-subsets (seed {args.subset_seed})"
        f" × {args.seeds} training seeds; cache {args.cache}"
    )
    start = time.perf_counter()
    runs = retrain(recipe, train, queries, subsets, seeds, cache=args.cache,
                   settings=recipe.settings(), progress=True)  # fmt: skip
    print(
        f"retraining: {np.nansum(runs.seconds):.0f} s of runs in the cache "
        f"({time.perf_counter() - start:.0f} s now); seed agreement (Spearman between the "
        f"mean of seeds {seeds[: len(seeds) // 2]} and of the rest, over subsets): "
        f"{np.nanmean(lds(np.ones((len(queries), len(train))), runs).seed_agreement):.3f}"
    )
    model, snaps = recipe.train(train, seed=0, checkpoints=args.checkpoints)
    print(f"scored model: trained on all {len(train)} with seed 0\n")
    print(f"{'method':<34}{'LDS':>7} ± s.e.    [quartiles over queries]")
    factors = {}
    for strategy in STRATEGIES:
        factors[strategy] = ik.fit_factors(model, train, "mlp", strategy=strategy, progress=False)
        result = ik.score(model, factors[strategy], queries, train, progress=False)
        lds_row(strategy, result, runs)
    for codec in args.codecs.split(","):
        store = ik.GradientStore.build(
            tmp / f"lds_{codec.replace(':', '_')}.h5", model, train, modules="mlp",
            factors=factors["ekfac"], progress=False, **store_options(codec),
        )  # fmt: skip
        lds_row(f"ekfac + store {codec}", ik.score(model, factors["ekfac"], queries, store,
                                                   progress=False), runs)  # fmt: skip
    default = factors["ekfac"].damping_for(None)
    for scale in (0.01, 0.1, 10.0, 100.0):
        damping = {name: scale * lam for name, lam in default.items()}
        result = ik.score(model, factors["ekfac"], queries, train, damping=damping, progress=False)
        lds_row(f"ekfac, damping × {scale:g}", result, runs)
    lds_row("ekfac, all layers (attn + mlp)", ik.score(
        model, ik.fit_factors(model, train, "all", progress=False), queries, train,
        progress=False), runs)  # fmt: skip
    models = [c.load_into(copy.deepcopy(model)) for c in snaps]
    per_checkpoint = checkpoint_results(models, queries, train, progress=False)
    weights = lr_weights(snaps)
    print(
        f"\ncheckpoints at steps {[c.step for c in snaps]}, learning-rate weights "
        f"{np.round(weights, 3).tolist()}"
    )
    final = lds(per_checkpoint[-1], runs)
    for c, result in zip(snaps, per_checkpoint, strict=True):
        lds_row(f"ekfac at step {c.step} only", result, runs, final)
    lds_row("multi-checkpoint, LR-weighted", combine_checkpoints(per_checkpoint, weights), runs,
            final)  # fmt: skip
    uniform = np.full(len(snaps), 1 / len(snaps))
    lds_row("multi-checkpoint, uniform", combine_checkpoints(per_checkpoint, uniform), runs, final)
    # A control: is the gain history, or just averaging several sets of scores? Average the
    # final checkpoints of as many runs on all the data with other seeds.
    finals = [model] + [recipe(train, seed) for seed in range(1, args.checkpoints)]
    per_seed = checkpoint_results(finals, queries, train, progress=False)
    equal = np.full(len(finals), 1 / len(finals))
    lds_row(f"control: {len(finals)} seeds' final models", combine_checkpoints(per_seed, equal),
            runs, final)  # fmt: skip
    print()


def exact_table(args, tmp: Path) -> None:
    """Exact damped Gauss–Newton influence (the ε → 0 PBRF, influencekit.validate.exact) in
    the validation setting at the default damping, against every method's scores."""
    setting, recipe = load_setting(), Recipe()
    train = setting.train
    queries = setting.queries[:: len(setting.queries) // args.exact_queries][: args.exact_queries]
    model, snaps = recipe.train(train, seed=0, checkpoints=args.checkpoints)
    ekfac = ik.fit_factors(model, train, "mlp", progress=False)
    damping = ekfac.damping_for(None)
    print(
        f"## Exact GNH influence: validation setting, queries {[q.id for q in queries]}, all "
        f"{len(train)} training sequences, default damping per layer "
        f"{ {k: round(v, 4) for k, v in damping.items()} }, CG preconditioned by EK-FAC, "
        f"tol 1e-6, ≤{args.exact_iter} iterations"
    )
    start = time.perf_counter()
    truth, infos = exact_influence(model, train, queries, damping=damping, factors=ekfac,
                                   max_iter=args.exact_iter, return_info=True)  # fmt: skip
    print(
        f"exact: {time.perf_counter() - start:.0f} s, CG iterations "
        f"{[i.iterations for i in infos]}, residuals {[f'{i.residual:.1e}' for i in infos]}\n"
    )
    rows = method_scores(model, train, queries, ekfac, damping, args.codecs, tmp)
    models = [c.load_into(copy.deepcopy(model)) for c in snaps]
    per_checkpoint = checkpoint_results(models, queries, train, progress=False)
    rows.append(("multi-checkpoint, LR-weighted",
                 combine_checkpoints(per_checkpoint, lr_weights(snaps)).scores))  # fmt: skip
    print_comparison(rows, truth)


def metagradient_table(args, tmp: Path) -> None:
    """The LDS of the exact metagradient, from replayed training runs of the recipe."""
    import json

    setting, recipe = load_setting(), Recipe()
    train, queries = setting.train, setting.queries
    runs = Retraining.load(args.cache)
    print(
        f"## Exact metagradient: validation setting, {len(train)} quotes, {len(queries)} "
        f"queries, replayed in float64 from seeds 0..{args.replay_seeds - 1}; LDS against "
        f"{args.cache}"
    )
    model = recipe(train, seed=0)
    ekfac = ik.score(model, ik.fit_factors(model, train, "mlp", progress=False), queries, train,
                     progress=False)  # fmt: skip
    final = lds_row("ekfac at the final weights", ekfac, runs)
    start, replayed = time.perf_counter(), []
    for seed in range(args.replay_seeds):
        saved = None if args.scores is None else args.scores.with_suffix(f".seed{seed}.npy")
        if saved is not None and saved.is_file():
            replayed.append(np.load(saved))
        else:
            replayed.append(metagradient_scores(recipe, train, queries, seed=seed))
            if saved is not None:
                np.save(saved, replayed[-1])
        lds_row(f"exact metagradient, seed {seed}", replayed[-1], runs, final)
    seconds = time.perf_counter() - start
    exact = lds_row(f"exact metagradient, mean of {len(replayed)}", np.mean(replayed, 0), runs,
                    final)  # fmt: skip

    def summary(out):
        ok = np.isfinite(out.per_query)
        return {"mean": float(out.mean),
                "se": float(out.per_query[ok].std(ddof=1) / np.sqrt(ok.sum()))}  # fmt: skip

    found = {"ekfac_final": summary(final), "exact_metagradient": summary(exact)}
    if args.masked:
        # Its own intervention: seed 0's run with each half-subset's weights at 1, the rest
        # at 0 (the same batches and steps), where the retraining target trains on the
        # subset alone (half the steps, other batches).
        subsets = random_subsets(len(train), args.masked, seed=args.subset_seed)
        position = {name: i for i, name in enumerate(train.ids)}

        def masked_run(subset, seed):
            weights = torch.zeros(len(train), dtype=torch.float64)
            weights[[position[name] for name in subset.ids]] = 1.0
            return replay_training(recipe, train, seed=seed, weights=weights).model

        own = retrain(masked_run, train, queries, subsets, [0], progress=True)
        print(f"\nagainst seed 0's run with {args.masked} half-subsets masked to weight 0:")
        found["masked"] = {
            "subsets": args.masked,
            "ekfac_final": summary(lds_row("ekfac at the final weights", ekfac, own)),
            "exact_metagradient": summary(lds_row("exact metagradient, seed 0", replayed[0], own)),
        }
    found.update(replay_seeds=args.replay_seeds, replay_seconds=round(seconds))
    print(json.dumps(found))


def main(argv: list[str] | None = None) -> None:
    """Parse options and print the chosen tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["pbrf", "lds", "exact", "metagradient", "all"],
                        default="all", help="all = pbrf and lds")  # fmt: skip
    parser.add_argument("--n-train", type=int, default=6, help="PBRF: training sequences")
    parser.add_argument("--n-queries", type=int, default=2, help="PBRF: queries")
    parser.add_argument(
        "--damping-scale", type=float, default=100.0,
        help="PBRF: λ = this × mean of the default per-layer 0.1·mean(Λ) (small λ: slow solves)",
    )  # fmt: skip
    parser.add_argument("--epsilon", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=300, help="PBRF: L-BFGS iterations at most")
    parser.add_argument(
        "--codecs",
        default="dense,kron:16,kron:64,lowrank:4,lowrank:16,budget:20544,budget:65536,default",
    )
    parser.add_argument("--subsets", type=int, default=64, help="LDS: random half-subsets")
    parser.add_argument("--subset-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=4, help="LDS: training seeds per subset")
    parser.add_argument("--checkpoints", type=int, default=4, help="multi-checkpoint: snapshots")
    parser.add_argument("--cache", type=Path, default=SHIPPED_RUNS)
    parser.add_argument("--exact-queries", type=int, default=1, help="exact: queries solved")
    parser.add_argument("--exact-iter", type=int, default=2000, help="exact: CG iterations")
    parser.add_argument("--replay-seeds", type=int, default=1, help="metagradient: runs")
    parser.add_argument(
        "--scores",
        type=Path,
        default=None,
        help="metagradient: keep (or reuse) the scores at PATH.seedN.npy",
    )
    parser.add_argument("--masked", type=int, default=0,
                        help="metagradient: LDS against this many masked runs")  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (2 is 1.5x faster on an idle 2-core machine, far slower on a busy one)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("pbrf", "all"):
            pbrf_table(args, Path(tmp))
        if args.part in ("lds", "all"):
            lds_table(args, Path(tmp))
        if args.part == "exact":
            exact_table(args, Path(tmp))
        if args.part == "metagradient":
            metagradient_table(args, Path(tmp))


if __name__ == "__main__":
    main()
