"""Gradient-store benchmark: size, build cost, read cost, accuracy and speed-up per codec.

One GPT-2-shaped model (benchmarks/engine.py's: random init, float32, eval) and one synthetic
training set; every figure below is a ratio of two timings taken side by side in this run
(this machine is shared and noisy: seconds do not carry over, ratios do).

Columns, per codec:
    bytes/ex      gradient bytes stored per training sequence (all tracked layers)
    build x       time of ``GradientStore.build`` over the data / a plain forward+backward over
                  the same batches (the mean of one run just before and one just after)
    read x        time to read every stored array with plain h5py / time of the streaming
                  scoring pass over the same store (``stored_scores``): >= 0.7 means scoring
                  runs at 70% or more of the raw read speed
    answer x      time to score a new batch of queries on the fly (``ik.score`` with the
                  ``TextDataset``) / time to score them from the store (``ik.score`` with the
                  store, query gradients included): how much faster the store answers
    pearson       mean over queries of the Pearson correlation with the exact scores
    top10         mean over queries of |top-10 ∩ exact top-10| / 10
    full-rank     scored with ``query_rank="full"`` (every preconditioned query exact)
    (r=16)        the same with ``query_rank=16`` (each preconditioned query cut to rank 16)
    top10+refine  top10 after ``refine=20`` (each query's top 20 rescored exactly)
    default       answer x and pearson of ``ik.score`` with no argument beyond the store
                  (``query_rank="auto"``), and the ranks it chose (``full`` where exact)

Then peak RSS of a fresh process scoring a store of N/4 and of N sequences with ``top_k=10``:
flat means memory does not grow with the store.

Usage:
    python benchmarks/store.py                # full run (about 25 minutes on 2 CPU cores)
    python benchmarks/store.py --quick        # smoke run, small model, well under a minute
    python benchmarks/store.py --codecs kron:64,eig:64 --sequences 768 --device cuda
    python benchmarks/store.py --demo small   # the shipped, trained demo model and corpus
                                              # (22 demo queries; no RSS measurement)
    python benchmarks/store.py --wide --codecs lowrank:8,kron:64 --sequences 300
                                              # the wide trained model of
                                              # benchmarks/wide_model.py (8 of its held-out
                                              # queries; no RSS measurement)
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/ is not a package

from engine import (
    FULL,
    QUICK,
    build_data,
    build_model,
    plain_forward_backward,
    store_options,
    timed,
)

import influencekit as ik
from influencekit.data import example_batches, length_order
from influencekit.keep import AllScores
from influencekit.scoring import preconditioned, query_tokens
from influencekit.settings import RunSettings
from influencekit.store.scoring import compressed_queries, stored_scores

CODECS = (
    "dense",
    "kron:64",
    "kron:128",
    "eig:64",
    "eig:128",
    "lowrank:4",
    "lowrank:8",
    "lowrank:16",
)
RANK = 16  # query_rank of the (r=16) columns
DENSE_MAX = 32  # dense stores are large: the dense row uses the first 32 sequences only
REFINE = 20  # refine= of the top10+refine column (--refine)
QUIET = {"progress": False}


def pearsons(a: np.ndarray, b: np.ndarray) -> list[float]:
    return [float(np.corrcoef(x, y)[0, 1]) for x, y in zip(a, b, strict=True)]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(pearsons(a, b)))


def top10(a: np.ndarray, b: np.ndarray) -> float:
    hits = [
        len(set(np.argsort(-x)[:10]) & set(np.argsort(-y)[:10])) / 10
        for x, y in zip(a, b, strict=True)
    ]
    return float(np.mean(hits))


def raw_read(store: ik.GradientStore) -> None:
    """Read every stored gradient array with plain h5py: the floor of any scoring pass."""
    for path in store.part_paths():
        with h5py.File(path, "r") as f:
            for name in f["layers"]:
                for key in f["layers"][name]:
                    f["layers"][name][key][()]


def preconditioned_queries(model, factors, queries, store, device, rank):
    """Each layer's preconditioned queries (rank ``rank`` if given), as ``score`` makes them."""
    layers = factors.tracked_layers(model)
    run = RunSettings(device=device, **QUIET).on(model)
    tokens = query_tokens(model, layers, ik.as_queries(queries), store.tokenizer, run)
    forms = preconditioned(factors, tokens, factors.damping_for(None), rank)
    return layers, forms


def stream_time(store, layers, forms, device) -> float:
    """Seconds of the streaming pass alone: every stored block contracted and kept."""
    names = [layer.name for layer in layers]

    queries = compressed_queries(store, names, [forms[n] for n in names])  # outside the timing

    def stream() -> None:
        keep = None
        blocks = stored_scores(store, names, queries, device=device, **QUIET)
        for indices, block in blocks:
            keep = keep or AllScores(block.shape[0], len(store), len(layers))
            keep.add(indices, block)

    return min(timed(stream, device) for _ in range(2))


def timed_score(*args, **kwargs):
    start = time.perf_counter()
    result = ik.score(*args, **kwargs, **QUIET)
    return time.perf_counter() - start, result


def measure_codec(
    codec, model, factors, train, queries, exact, t_fly, batches, device, root, refine=REFINE
):
    """One row of the table; ``codec`` as :func:`engine.store_options` reads it."""
    n = DENSE_MAX if codec == "dense" else len(train)
    data = train[:n]
    base_before = timed(lambda: plain_forward_backward(model, batches[n]), device)
    path = root / f"{codec.replace(':', '-').replace('@', '-')}.h5"
    t_build = timed(
        lambda: ik.GradientStore.build(
            path, model, data, factors=factors, batch_size=8, **store_options(codec), **QUIET
        ),
        device,
    )
    base_after = timed(lambda: plain_forward_backward(model, batches[n]), device)
    store = ik.GradientStore.open(path)
    raw_read(store)  # warm the page cache for both reads alike
    t_read = min(timed(lambda: raw_read(store), device) for _ in range(2))
    t_stream = stream_time(
        store, *preconditioned_queries(model, factors, queries, store, device, None), device
    )
    t_stream_r = stream_time(
        store, *preconditioned_queries(model, factors, queries, store, device, RANK), device
    )
    t_answer, result = timed_score(model, factors, queries, store, query_rank="full")
    t_answer_r, result_r = timed_score(model, factors, queries, store, query_rank=RANK)
    t_answer_a, result_a = timed_score(model, factors, queries, store)  # the default: auto
    _, refined = timed_score(model, factors, queries, store, top_k=10, refine=refine)
    truth = exact.scores[:, :n]
    scale = n / len(train)  # the dense row answers fewer sequences: compare per sequence
    fidelity = store.fidelity
    forced = store_options(codec).get("codec") == store.codec
    return {
        "codec": codec if forced else f"{codec}={store.codec}",
        "dtype": store.config.dtype,
        "probe": None if fidelity is None else fidelity.pearson_min,
        "pearson_min": min(pearsons(result.scores, truth)),
        "pearson_min_a": min(pearsons(result_a.scores, truth)),
        "n": n,
        "bytes": store.bytes_per_example(),
        "build": t_build / ((base_before + base_after) / 2),
        "read": t_read / t_stream,
        "read_r": t_read / t_stream_r,
        "answer": t_fly * scale / t_answer,
        "answer_r": t_fly * scale / t_answer_r,
        "answer_a": t_fly * scale / t_answer_a,
        "pearson_a": pearson(result_a.scores, truth),
        "ranks_a": sorted(set(result_a.meta["query_ranks"].values()), key=str),
        "pearson": pearson(result.scores, truth),
        "pearson_r": pearson(result_r.scores, truth),
        "top10": top10(result.scores, truth),
        "top10_r": top10(result_r.scores, truth),
        "top10_refine": top10_of(refined, truth),
    }


def top10_of(result: ik.InfluenceResult, truth: np.ndarray) -> float:
    """|top-10 of a top-k result ∩ exact top-10| / 10, averaged over queries."""
    hits = [
        len(set(result.indices[q].tolist()) & set(np.argsort(-truth[q])[:10])) / 10
        for q in range(len(truth))
    ]
    return float(np.mean(hits))


def peak_rss(args, setting, store: Path, factors: Path) -> float:
    """Peak RSS (MiB) of a fresh process that scores ``store`` with ``top_k=10``."""
    cmd = [sys.executable, __file__, "--rss-child", str(store), str(factors)]
    cmd += ["--sequences", str(setting.n_sequences), "--device", args.device]
    if args.quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["rss_mib"]


def rss_child(args, setting) -> None:
    import resource

    store_path, factors_path = args.rss_child
    model = build_model(setting, torch.device(args.device))
    _, queries = build_data(dataclasses.replace(setting, n_sequences=8))
    store = ik.GradientStore.open(store_path)
    ik.score(model, ik.Factors.load(factors_path), queries, store, top_k=10, **QUIET)
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rss_mib": rss_kib / 1024}))


def wide_folder() -> Path:
    """Where benchmarks/wide_model.py keeps its model by default."""
    cache = os.environ.get("INFLUENCEKIT_CACHE") or "~/.cache/influencekit"
    return Path(cache).expanduser() / "wide-model"


def load_wide(folder: Path, n_sequences: int, device: torch.device):
    """The wide trained model, its first ``n_sequences`` training records and 8 held-out
    queries, as benchmarks/wide_model.py wrote them."""
    recipe = folder / "recipe.json"
    if not recipe.is_file() or not json.loads(recipe.read_text()).get("finished"):
        raise SystemExit(f"{folder}: no finished wide model; run python benchmarks/wide_model.py")
    max_length = json.loads(recipe.read_text())["settings"]["max_length"]
    model, tokenizer = ik.load_model(folder, device=device)
    train = ik.TextDataset.from_jsonl(folder / "train.jsonl", tokenizer, max_length)
    queries = ik.load_queries(folder / "queries.jsonl")[:8]
    return model, train[: min(n_sequences, len(train))], queries


def model_name(args) -> str:
    if args.demo:
        return f"demo {args.demo}"
    return "wide GPT-NeoX" if args.wide else "GPT-2"


def report(rows, rss, train, n_params, refine=REFINE) -> None:
    print(
        f"\n{'codec':<26} {'dtype':<7} {'seqs':>5} {'bytes/ex':>10} {'build x':>8} "
        f"{'read x':>7} {'answer x':>9} {'pearson':>11} {'top10':>6} {'read x':>7} "
        f"{'answer x':>9} {'pearson':>8} {'top10':>6} {'top10':>6} {'answer x':>9} "
        f"{'pearson':>11} {'probe':>6}  ranks"
    )
    print(
        f"{'':<68}{'full-rank queries (pearson min/mean)':^38}"
        f"{'query_rank=' + str(RANK):^34}{'refine':>6}{'default (auto)':^29}{'min':>5}"
    )
    for r in rows:
        probe = "-" if r["probe"] is None else f"{r['probe']:.3f}"
        print(
            f"{r['codec']:<26} {r['dtype']:<7} {r['n']:>5} {r['bytes']:>10,} "
            f"{r['build']:>7.2f}x {r['read']:>6.2f}x {r['answer']:>8.1f}x "
            f"{r['pearson_min']:>5.3f}/{r['pearson']:.3f} {r['top10']:>6.2f} "
            f"{r['read_r']:>6.2f}x {r['answer_r']:>8.1f}x {r['pearson_r']:>8.3f} "
            f"{r['top10_r']:>6.2f} {r['top10_refine']:>6.2f} {r['answer_a']:>8.1f}x "
            f"{r['pearson_min_a']:>5.3f}/{r['pearson_a']:.3f} {probe:>6}  "
            f"{'/'.join(map(str, r['ranks_a']))}"
        )
    print(
        f"\ntargets: build x <= 1.3, read x >= 0.7, answer x >= 20 at pearson >= 0.95 "
        f"({n_params / 1e6:.1f}M-parameter model, {len(train)} sequences; the dense "
        f"row uses the first {DENSE_MAX}, its answer x is scaled to the same count). "
        f"refine: top_k=10, refine={refine}, default query rank. probe: the Pearson minimum "
        f"the store measured on its own at build (store.fidelity)."
    )
    for codec, (small, large, n_small, n_large) in rss.items():
        print(
            f"peak RSS scoring {codec} with top_k=10: {small:.0f} MiB at {n_small} sequences, "
            f"{large:.0f} MiB at {n_large} ({large / small:.2f}x)"
        )


def pareto_svg(rows: list[dict], path: Path, title: str) -> None:
    """Fidelity (Pearson minimum and mean over queries, default query rank) against bytes
    per sequence (log scale), one labelled point pair per row, as a plain SVG file."""
    width, height, left, bottom, top, right = 720, 420, 70, 50, 40, 170
    xs = [np.log10(r["bytes"]) for r in rows]
    lo, hi = np.floor(min(xs) * 2) / 2, np.ceil(max(xs) * 2) / 2 + 1e-9

    def x_of(b: float) -> float:
        return left + (np.log10(b) - lo) / (hi - lo) * (width - left - right)

    def y_of(v: float) -> float:
        return height - bottom - max(0.0, v) * (height - bottom - top)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="20" font-size="14">{html.escape(title)}</text>',
    ]
    for v in np.arange(0, 1.01, 0.2):  # y grid: Pearson
        y = y_of(v)
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" '
                   'stroke="#ddd"/>')  # fmt: skip
        out.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{v:.1f}</text>')
    for e in np.arange(lo, hi, 0.5):  # x grid: bytes, log scale
        x = x_of(10**e)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{height - bottom}" '
                   'stroke="#eee"/>')  # fmt: skip
        out.append(f'<text x="{x:.1f}" y="{height - bottom + 16}" text-anchor="middle">'
                   f"{10**e / 1e3:,.0f} KB</text>")  # fmt: skip
    out.append(f'<text x="{(width - right + left) / 2}" y="{height - 12}" '
               'text-anchor="middle">bytes per sequence (log scale)</text>')  # fmt: skip
    out.append(f'<text x="16" y="{(height - bottom + top) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {(height - bottom + top) / 2})">Pearson vs exact '
               "(dot: min over queries; ring: mean)</text>")  # fmt: skip
    placed: list[tuple[float, float]] = []  # labels so far: move a new one below any it hits
    for r in rows:
        x, y_min, y_mean = x_of(r["bytes"]), y_of(r["pearson_min_a"]), y_of(r["pearson_a"])
        label_y = y_min + 4
        while any(abs(x - px) < 150 and abs(label_y - py) < 13 for px, py in placed):
            label_y += 13
        placed.append((x, label_y))
        colour = "#c0392b" if "sparse" in r["codec"] else "#2c3e50"
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y_min:.1f}" y2="{y_mean:.1f}" '
                   f'stroke="{colour}"/>')  # fmt: skip
        out.append(f'<circle cx="{x:.1f}" cy="{y_min:.1f}" r="4" fill="{colour}"/>')
        out.append(f'<circle cx="{x:.1f}" cy="{y_mean:.1f}" r="4" fill="none" '
                   f'stroke="{colour}"/>')  # fmt: skip
        values = "8-bit" if "sparse8" in r["codec"] else r["dtype"]
        out.append(f'<text x="{x + 7:.1f}" y="{label_y:.1f}">'
                   f"{html.escape(r['codec'])} ({values})</text>")  # fmt: skip
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def replot(log: Path, plot: Path | None) -> None:
    """The Pareto plot from a finished run's output: its header and printed rows."""
    if plot is None:
        raise SystemExit("--replot needs --plot FILE.svg")
    lines = log.read_text().splitlines()
    rows = [json.loads(line.split(": ", 1)[1]) for line in lines if line.startswith("  ")
            and ": {" in line]  # fmt: skip
    model = next(line for line in lines if line.startswith("model: "))
    name = model.split(" n_layer")[0].removeprefix("model: ")
    n = rows[-1]["n"]
    pareto_svg(rows, plot, f"{name}, {n} sequences, 8 queries")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model and data (smoke run)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sequences", type=int, default=None, help="default 1024 (48 quick)")
    parser.add_argument("--codecs", default=",".join(CODECS), help="comma-separated codecs")
    parser.add_argument(
        "--demo", choices=["small", "large"], default=None, help="shipped model and corpus"
    )
    parser.add_argument(
        "--wide",
        nargs="?",
        const=str(wide_folder()),
        default=None,
        metavar="DIR",
        help="the wide model of benchmarks/wide_model.py (default: its cache folder)",
    )
    parser.add_argument("--rss-codec", default="lowrank:8", help="codec of the RSS measurement")
    parser.add_argument("--refine", type=int, default=REFINE, help="refine= of top10+refine")
    parser.add_argument("--plot", type=Path, default=None, help="write the Pareto plot (SVG)")
    parser.add_argument(
        "--replot",
        type=Path,
        default=None,
        metavar="LOG",
        help="with --plot: draw it from the rows a finished run printed to LOG, and stop",
    )
    parser.add_argument("--rss-child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.replot is not None:
        return replot(args.replot, args.plot)
    os.environ["INFLUENCEKIT_PROGRESS"] = "0"
    setting = QUICK if args.quick else FULL
    n_default = 48 if args.quick else 1024
    setting = dataclasses.replace(setting, n_sequences=args.sequences or n_default)
    if args.rss_child:
        return rss_child(args, setting)
    device = torch.device(args.device)
    if args.demo:
        model, tokenizer = ik.demo.load_demo_model(args.demo, device=device)
        train = ik.demo.load_corpus(tokenizer, limit=args.sequences)
        queries = ik.demo.QUERIES
    elif args.wide:
        model, train, queries = load_wide(Path(args.wide), setting.n_sequences, device)
    else:
        model = build_model(setting, device)
        train, queries = build_data(setting)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"torch {torch.__version__} | device {device} | threads {torch.get_num_threads()}\n"
        f"model: {model_name(args)} n_layer={model.config.num_hidden_layers} "
        f"n_embd={model.config.hidden_size}, "
        f"{n_params / 1e6:.1f}M params; {len(train)} sequences, {train.n_tokens} tokens; "
        f"{len(queries)} queries; modules mlp",
        flush=True,
    )
    factors = ik.fit_factors(model, train, "mlp", **QUIET)
    order = {n: length_order(train[:n]) for n in {len(train), DENSE_MAX}}
    batches = {
        n: [b.to(device) for b in example_batches(train[:n], setting.batch_size, o)]
        for n, o in order.items()
    }
    start = time.perf_counter()
    exact = ik.score(model, factors, queries, train, **QUIET)
    t_fly = time.perf_counter() - start
    print(f"on-the-fly exact scores: {t_fly:.1f} s", flush=True)
    rows, rss = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for codec in args.codecs.split(","):
            row = measure_codec(
                codec, model, factors, train, queries, exact, t_fly, batches, device, root,
                args.refine,
            )  # fmt: skip
            rows.append(row)
            shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
            print(f"  {codec}: {json.dumps(shown)}", flush=True)
        if args.plot is not None:
            title = f"{model_name(args)}, {len(train)} sequences, {len(queries)} queries"
            pareto_svg(rows, args.plot, title)
        if args.demo or args.wide:  # the RSS child rebuilds the synthetic setting only
            return report(rows, rss, train, n_params, args.refine)
        factors.save(root / "factors.h5")
        small_n = max(1, len(train) // 4)
        small = root / "rss-small.h5"
        large = root / "rss-large.h5"
        for path, n in ((small, small_n), (large, len(train))):
            ik.GradientStore.build(
                path, model, train[:n], codec=args.rss_codec, factors=factors, **QUIET
            )
        rss[args.rss_codec] = (
            peak_rss(args, setting, small, root / "factors.h5"),
            peak_rss(args, setting, large, root / "factors.h5"),
            small_n,
            len(train),
        )
    report(rows, rss, train, n_params, args.refine)


if __name__ == "__main__":
    main()
