"""The ``influencekit`` command line: the same names as the Python API.

    influencekit demo [--out DIR] [--quick] [--model small|large] [--device D]
                                           # the shipped model and corpus, end to end
    influencekit fit --model DIR --train FILE --out FACTORS.h5 [--modules mlp] [--fisher sampled]
    influencekit build --model DIR --train FILE --out STORE.h5 [--codec kron:64] [--modules mlp]
                       [--part-size N]
    influencekit score --model DIR --factors F.h5 --store S.h5 --queries Q.jsonl --out RESULT.h5
                       [--top-k K] [--query-rank auto|full|R] [--damping X] [--refine K]
    influencekit score ... --train FILE ...  # training gradients on the fly instead of a store
    influencekit report RESULT.h5 --train FILE --out report.html [--model DIR --factors F.h5]
                                           # the explorer as one offline HTML page
    influencekit info FILE.h5

Every output is an HDF5 file any HDF5 tool can read. Errors the kit raises on purpose are
printed as one line naming the file/line/field, with exit status 2 (no traceback).

Example:
    >>> main(["info", "--help"])   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .checks import ACCUMULATION_DTYPES, AMP_DTYPES
from .distributed import active, init_from_env, is_main
from .errors import InfluenceKitError, ParameterError
from .factors import FISHERS, STRATEGIES
from .models import SELECTIONS
from .store.layout import DTYPES as STORE_DTYPES

# The command line's short names for the autocast dtypes.
AMP = {"none": None, "bf16": AMP_DTYPES["bfloat16"], "fp16": AMP_DTYPES["float16"]}


def _modules(text: str) -> str | list[str]:
    """``mlp`` / ``attention`` / ``all`` / ``lora``, or a comma-separated list of module names."""
    return text if text in SELECTIONS else [n for n in text.split(",") if n]


def _query_rank(text: str) -> str | int:
    """``auto``, ``full`` or an int (checked by ``score``)."""
    return text if text in ("auto", "full") else int(text)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="model directory, hub id in the local Hugging Face cache, or LoRA adapter directory",
    )
    _add_loading_args(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    p.add_argument("--amp", choices=AMP, default="none", help="forward in bf16/fp16 (autocast)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--max-memory",
        default=None,
        help="memory the stage may hold, e.g. 8GiB (default: half the free memory); layers "
        "are taken in groups that fit, a pass over the data each",
    )


def _add_loading_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default=None, help="base model of a LoRA adapter (default: its own)")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a hub id")
    p.add_argument(
        "--model-dtype",
        default="auto",
        help="auto (the checkpoint's) | float32 | bfloat16 | float16",
    )


def _add_train_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--train", required=required, help="training JSONL, one record per sequence")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sequence (128)")
    p.add_argument("--chunk", action="store_true", help="split long records into windows")


def _add_modules(p: argparse.ArgumentParser, default: str | None = "mlp") -> None:
    shown = "mlp" if default else "the factors' layers, else mlp"
    p.add_argument(
        "--modules",
        type=_modules,
        default=default,
        help=f"mlp | attention | all | lora | name1,name2,... (default: {shown})",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="influencekit",
        description="Which training data made the model say this? EK-FAC influence functions.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="fit, build, score and report on the shipped model and corpus"
    )
    demo.add_argument(
        "--out", default=None, help="output folder (default ./influencekit-demo[-large][-quick])"
    )
    demo.add_argument("--quick", action="store_true", help="a small slice of the corpus (<1 min)")
    demo.add_argument("--model", choices=("small", "large"), default="small", help="(small)")
    demo.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    demo.add_argument("--show", type=int, default=3, help="rows printed per query (3)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")

    fit = sub.add_parser("fit", help="fit EK-FAC (or baseline) factors")
    _add_model_args(fit)
    _add_train_args(fit)
    _add_modules(fit)
    fit.add_argument("--out", required=True, help="factors HDF5 file to write")
    fit.add_argument(
        "--dtype", choices=ACCUMULATION_DTYPES, default="float32", help="accumulation dtype"
    )
    fit.add_argument("--strategy", choices=STRATEGIES, default="ekfac")
    fit.add_argument("--fisher", choices=FISHERS, default="sampled")
    fit.add_argument("--max-examples", type=int, default=None)
    fit.add_argument("--seed", type=int, default=0)

    build = sub.add_parser(
        "build", help="compute and store compressed training gradients (resumable)"
    )
    _add_model_args(build)
    _add_train_args(build)
    _add_modules(build, default=None)
    build.add_argument("--out", required=True, help="gradient store to create or continue")
    build.add_argument(
        "--codec",
        default=None,
        help="force a codec: dense | kron:K | lowrank:R | eig:K | sparse:K "
        "(default: the best that fits --budget)",
    )
    build.add_argument(
        "--budget",
        default=None,
        help="bytes per sequence, e.g. 128KiB or 660KB (default: those of lowrank:8 in float32)",
    )
    build.add_argument(
        "--dtype",
        choices=STORE_DTYPES,
        default=None,
        help="dtype on disk (float16 for a chosen codec, float32 for a forced one)",
    )
    build.add_argument(
        "--no-fidelity", action="store_true", help="skip measuring the store's fidelity"
    )
    build.add_argument(
        "--fidelity-queries", default=None, help="JSONL queries to measure the fidelity with"
    )
    build.add_argument(
        "--part-size", "--chunk-size", type=int, default=None, help="examples per part (commit)"
    )
    build.add_argument("--seed", type=int, default=0, help="seed of the kron projections")
    build.add_argument(
        "--factors", default=None, help="factors file (eig:K needs it; sparse:K is best with it)"
    )

    sc = sub.add_parser("score", help="score queries against a gradient store (or on the fly)")
    _add_model_args(sc)
    _add_train_args(sc, required=False)
    sc.add_argument("--store", default=None, help="gradient store from `influencekit build`")
    sc.add_argument("--factors", required=True, help="factors file from `influencekit fit`")
    sc.add_argument("--queries", required=True, help="JSONL with prompt and completion")
    sc.add_argument("--out", required=True, help="result HDF5 file to write")
    sc.add_argument(
        "--dtype", choices=ACCUMULATION_DTYPES, default="float32", help="accumulation dtype"
    )
    sc.add_argument("--damping", type=float, default=None, help="default 0.1 × mean(Λ)")
    sc.add_argument(
        "--query-rank",
        type=_query_rank,
        default="auto",
        help="auto (default: truncated where the store gains from it) | full | an int",
    )
    sc.add_argument("--top-k", type=int, default=None, help="keep only each query's top K")
    sc.add_argument("--refine", type=int, default=None, help="rescore top K exactly (store)")
    sc.add_argument("--show", type=int, default=5, help="rows printed per query (5)")

    rep = sub.add_parser("report", help="write a result as one self-contained HTML page")
    rep.add_argument("result", help="result HDF5 file from `influencekit score`")
    _add_train_args(rep)
    rep.add_argument("--out", required=True, help="HTML file to write")
    rep.add_argument("--model", default=None, help="model (as for score): adds token heatmaps")
    _add_loading_args(rep)
    rep.add_argument("--factors", default=None, help="factors file (with --model)")
    rep.add_argument("--device", default=None, help="cpu, cuda, ... (with --model)")
    rep.add_argument("--rows", type=int, default=20, help="top sequences per query (20)")
    rep.add_argument("--token-rows", type=int, default=3, help="rows shown by token (3)")
    rep.add_argument("--title", default=None, help="page title (default: the result's name)")

    info = sub.add_parser("info", help="describe an influencekit HDF5 file")
    info.add_argument("file")
    return parser


def _load(args):
    """The model and training set of ``args``; the training file is checked before the model
    loads (a bad line costs no model load)."""
    from .data import TextDataset, check_training_file

    check_training_file(args.train, max_length=args.max_length)
    model, tokenizer = _load_model(args)
    train = TextDataset.from_jsonl(args.train, tokenizer, args.max_length, chunk=args.chunk)
    return model, train


def _load_model(args):
    from .loading import load_model

    # load_model checks dtype, device and the folder before any weights load
    return load_model(
        args.model,
        dtype=args.model_dtype,
        device=args.device,
        revision=args.revision,
        base=args.base,
    )


def cmd_demo(args) -> None:
    from transformers.utils import logging as hf_logging

    from .demo.pipeline import run_demo, summary

    hf_logging.disable_progress_bar()  # its weight-loading bar would sit among the stage bars
    run = run_demo(
        args.out, quick=args.quick, size=args.model, device=args.device, progress=not args.quiet
    )
    print(summary(run, args.show))
    timings = ", ".join(f"{name} {sec:.1f} s" for name, sec in run.seconds.items())
    reused = f" (reused: {', '.join(run.reused)})" if run.reused else ""
    print(f"\ntimings: {timings}{reused}")
    for name, path in run.paths.items():
        print(f"wrote {name:<8} {path}")
    print(f"\nopen {run.paths['report'].resolve().as_uri()}")
    print("continue in Jupyter with notebooks/01_quickstart.ipynb (in the repository)")


def cmd_fit(args) -> None:
    from .fitting import fit_factors
    from .memory import parse_bytes

    if args.max_memory is not None:  # cheap checks before the model loads
        parse_bytes(args.max_memory, "--max-memory")
    model, train = _load(args)
    factors = fit_factors(  # written to --out as each group of layers is fitted (rank 0)
        model,
        train,
        args.modules,
        strategy=args.strategy,
        fisher=args.fisher,
        seed=args.seed,
        max_examples=args.max_examples,
        batch_size=args.batch_size,
        dtype=ACCUMULATION_DTYPES[args.dtype],
        amp_dtype=AMP[args.amp],
        progress=not args.quiet,
        max_memory=args.max_memory,
        path=args.out,
    )
    if is_main():
        print(
            f"wrote {args.out}: {factors.strategy} factors for {len(factors.modules)} layers "
            f"on {factors.meta['n_examples']} sequences"
        )


def cmd_build(args) -> None:
    from .data import load_queries
    from .factors import Factors
    from .memory import parse_bytes as parse_memory
    from .store import GradientStore
    from .store.budget import parse_bytes
    from .store.codecs import parse_codec

    if args.codec is not None:  # cheap checks before the model loads
        parse_codec(args.codec)
    if args.budget is not None:
        parse_bytes(args.budget)
    if args.max_memory is not None:
        parse_memory(args.max_memory, "--max-memory")
    probe = None if args.fidelity_queries is None else load_queries(args.fidelity_queries)
    factors = Factors.load(args.factors) if args.factors else None
    model, train = _load(args)
    store = GradientStore.build(
        args.out,
        model,
        train,
        modules=args.modules,
        codec=args.codec,
        budget=args.budget,
        fidelity=not args.no_fidelity,
        fidelity_queries=probe,
        dtype=args.dtype,
        batch_size=args.batch_size,
        amp_dtype=AMP[args.amp],
        part_size=args.part_size,
        seed=args.seed,
        factors=factors,
        progress=not args.quiet,
        max_memory=args.max_memory,
    )
    if is_main():
        print(f"wrote {store}")
        if store.fidelity is not None:
            print(f"fidelity: {store.fidelity}")


def cmd_score(args) -> None:
    from .data import load_queries
    from .factors import Factors
    from .memory import parse_bytes
    from .scoring import score
    from .store import GradientStore

    if (args.store is None) == (args.train is None):
        raise ParameterError(
            "--store/--train",
            [args.store, args.train],
            "exactly one of --store (stored gradients) or --train (on the fly)",
        )
    if args.max_memory is not None:
        parse_bytes(args.max_memory, "--max-memory")
    factors, queries = Factors.load(args.factors), load_queries(args.queries)  # cheap first
    if args.store is not None:
        store = GradientStore.open(args.store)
        model, tokenizer = _load_model(args)
        train, shown = store, store.dataset(tokenizer)
    else:
        model, train = _load(args)
        shown = train
    result = score(
        model,
        factors,
        queries,
        train,
        damping=args.damping,
        query_rank=args.query_rank,
        top_k=args.top_k,
        refine=args.refine,
        batch_size=args.batch_size,
        dtype=ACCUMULATION_DTYPES[args.dtype],
        amp_dtype=AMP[args.amp],
        progress=not args.quiet,
        max_memory=args.max_memory,
    )
    if is_main():  # every process holds the whole result: one writes it
        result.save(args.out)
        print(format_top_table(result, shown, args.show))
        print(f"\nwrote {args.out}")


def cmd_report(args) -> None:
    from .result import InfluenceResult
    from .widgets import InfluenceExplorer

    if (args.model is None) != (args.factors is None):
        raise ParameterError(
            "--model/--factors",
            [args.model, args.factors],
            "given together: token heatmaps need both --model and --factors",
        )
    result = InfluenceResult.load(args.result)
    model = factors = None
    if args.model is not None:
        from .factors import Factors

        model, train = _load(args)
        factors = Factors.load(args.factors)
    elif args.chunk:
        raise ParameterError(
            "--chunk", True, "given with --model and --factors (windows are cut by the tokenizer)"
        )
    else:
        train = _examples_without_tokenizer(args.train)
    explorer = InfluenceExplorer(result, train, model, factors, k=args.rows)
    title = args.title or f"influencekit: {Path(args.result).name}"
    facts = {"result": str(args.result), "training data": str(args.train)}
    path = explorer.to_html(args.out, title=title, facts=facts, token_rows=args.token_rows)
    print(f"wrote {path} ({len(result.query_ids)} queries, {len(result.train_ids):,} sequences)")


def _examples_without_tokenizer(path: str) -> list:
    """The records of a training JSONL as examples with text and metadata but no tokens,
    enough for a page without token heatmaps (ids as ``TextDataset.from_jsonl`` makes them)."""
    from .data import Example, _read_jsonl
    from .errors import DataError

    examples = []
    for number, record in _read_jsonl(path):
        if not isinstance(record.get("text"), str):
            raise DataError(f'{path}, line {number}: no "text" string')
        rid = str(record.get("id", number))
        meta = {k: v for k, v in record.items() if k not in ("text", "id")}
        examples.append(Example(len(examples), rid, record["text"], (), meta))
    return examples


def format_top_table(result, train, k: int = 3) -> str:
    """A plain-text table: each query, then its top-``k`` training sequences with scores."""
    lines = []
    for q, query in enumerate(result.queries or []):
        lines.append(f"\nquery {query.id!r}: {query.prompt!r} -> {query.completion!r}")
        lines.append(f"  {'rank':>4}  {'score':>12}  {'id':<12}  text")
        for rank, (i, value) in enumerate(result.top(q, k), start=1):
            example = train[i]
            lines.append(f"  {rank:>4}  {value:>12.4g}  {example.id:<12}  {example.text[:60]}")
    return "\n".join(lines)


def cmd_info(args) -> None:
    import h5py

    from .errors import FileFormatError, MissingFileError

    path = Path(args.file)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise FileFormatError(f"{path}: not an HDF5 file")
    with h5py.File(path, "r") as f:
        print(path)
        for key, value in sorted(f.attrs.items()):
            if key != "fidelity":
                print(f"  {key}: {_short(value)}")
        if "fidelity" in f.attrs:  # a store's: in words, not truncated JSON
            print(f"  fidelity: {_fidelity(f.attrs['fidelity'])}")
        f.visititems(_print_item)


def _fidelity(text: str) -> str:
    from .store.fidelity import Fidelity

    try:
        return str(Fidelity.from_dict(json.loads(text)))
    except (ValueError, TypeError):
        return _short(text)


def _print_item(name: str, obj) -> None:
    import h5py

    if isinstance(obj, h5py.Dataset):
        print(f"  /{name}: {obj.dtype} {obj.shape}")
    elif "name" in obj.attrs:
        print(f"  /{name}: {obj.attrs['name']}")


def _short(value) -> str:
    text = value if isinstance(value, str) else str(value)
    try:
        text = json.dumps(json.loads(text))
    except (ValueError, TypeError):
        pass
    return text if len(text) <= 200 else text[:197] + "..."


COMMANDS = {
    "demo": cmd_demo,
    "fit": cmd_fit,
    "build": cmd_build,
    "score": cmd_score,
    "report": cmd_report,
    "info": cmd_info,
}


def _under_torchrun(args) -> bool:
    """Set up a ``torchrun`` launch: ``fit``, ``build`` and ``score`` split their work over
    the processes; ``info`` and ``report`` run on rank 0 alone; ``demo`` refuses. Returns
    whether this process should run the command."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    if args.command == "demo":
        raise ParameterError(
            "WORLD_SIZE",
            os.environ["WORLD_SIZE"],
            "1 for the demo: run the demo in one process (it is not split over torchrun ranks)",
        )
    if args.command in ("fit", "build", "score"):
        args.device = init_from_env(args.device)
        return True
    return os.environ.get("RANK", "0") == "0"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``influencekit`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if _under_torchrun(args):
            COMMANDS[args.command](args)
    except (InfluenceKitError, OSError, ValueError) as err:  # OSError: unwritable --out, ...
        print(f"influencekit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Every file the kit writes is atomic or resumable: say so instead of a traceback.
        print(
            f"\ninfluencekit {args.command}: interrupted; files written so far are complete, "
            "and the same command continues where it stopped",
            file=sys.stderr,
        )
        return 130
    finally:
        if active():  # leave together: a rank tearing down early can abort its peers
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
