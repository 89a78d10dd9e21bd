"""Checks and figures behind docs/scaling.md: store-size formulas against real stores, the
machine figures the cost model extrapolates from, and the worked example computed from the
same formulas.

Sections (``--only`` picks some, comma-separated):
    bytes     tiny stores (Llama-style MLP without bias, GPT-2 MLP with bias) built with every
              codec and dtype; the formula against ``GradientStore.bytes_per_example()``, the
              logical bytes of the part files' gradient datasets and their allocated bytes;
              the manifest's codec tensors against their formula
    commit    time of one manifest write against the number of parts (every commit rewrites
              the manifest) and of ``GradientStore.open`` per part
    eigh      float64 ``torch.linalg.eigh`` time against n (the fit's fixed cost, on the CPU)
    read      ``GradientStore.blocks()`` throughput of one process, page cache warm
    example   the worked example (Llama-style 1B, 10M sequences of 512 tokens, 8 GPUs),
              computed from the formulas below and the ASSUMPTION constants

Usage:
    python benchmarks/scaling.py --probe 1b             # real widths (benchmarks/widths.py)
    python benchmarks/scaling.py                        # everything, about 3 minutes on 2 cores
    python benchmarks/scaling.py --eigh-sizes 2048,4096,8192   # as in docs/scaling.md (9 min)
    python benchmarks/scaling.py --only bytes,example   # formulas only, under a minute
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/ is not a package

import influencekit as ik
from influencekit.store.budget import LAYER_CAP, candidates, default_budget, shares
from influencekit.store.layout import PART_BYTES, Manifest, StoreConfig, write_manifest
from influencekit.store.writing import MAX_PART_SIZE
from influencekit.tiny import TINY_CORPUS, build_tokenizer

QUIET = {"progress": False}
ITEMSIZE = {"float16": 2, "float32": 4, "float64": 8}
OVERSAMPLE = 8  # store/codecs/lowrank.py: extra columns of the lowrank range finder
POWER_ITERATIONS = 2  # store/codecs/lowrank.py


# ---------------------------------------------------------------------------------------------
# The formulas of docs/scaling.md (written from store/codecs/, not calling it)


def parse(codec: str) -> tuple[str, int]:
    kind, _, size = codec.partition(":")
    return kind, int(size or 0)


def stored_elements(codec: str, d_out: int, d_in: int) -> int:
    """Numbers stored per example for one layer with gradient shape ``(d_out, d_in)``."""
    kind, k = parse(codec)
    if kind == "dense":
        return d_out * d_in
    if kind == "lowrank":
        return min(k, d_out, d_in) * (d_out + d_in)  # u (R, d_out), v (R, d_in)
    return min(k, d_out) * min(k, d_in)  # kron, eig: c (k_out, k_in)


def manifest_elements(codec: str, d_out: int, d_in: int) -> int:
    """float64 numbers the manifest keeps for one layer (projections or test matrix)."""
    kind, k = parse(codec)
    if kind == "dense":
        return 0
    if kind == "lowrank":
        return d_in * (min(k, d_out, d_in) + OVERSAMPLE)  # omega
    return min(k, d_out) * d_out + min(k, d_in) * d_in  # p_out, p_in


def bytes_per_example(codec: str, shapes: list[tuple[int, int]], dtype: str) -> int:
    return sum(stored_elements(codec, o, i) for o, i in shapes) * ITEMSIZE[dtype]


def contraction_macs(
    codec: str, d_out: int, d_in: int, queries: int, rank: int | None
) -> tuple[int, str]:
    """Multiply-adds per stored example and layer for a batch of ``queries``, and the path.

    As in store/codecs/: dense and projection codecs contract a dense (projected) query;
    lowrank keeps a rank-r query factored when ``Q·r·R·(d_out + d_in) <= (R + Q)·d_out·d_in``,
    otherwise it rebuilds the block's G_z (R·d_out·d_in) and takes one matmul (Q·d_out·d_in).
    """
    kind, k = parse(codec)
    if kind == "dense":
        return queries * d_out * d_in, "matmul"
    if kind in ("kron", "eig"):
        return queries * min(k, d_out) * min(k, d_in), "matmul"
    r_store = min(k, d_out, d_in)
    dense = (r_store + queries) * d_out * d_in
    if rank is not None:
        factored = queries * rank * r_store * (d_out + d_in)
        if factored <= dense:
            return factored, "factored"
    return dense, "rebuild G_z"


def encode_macs_per_token(codec: str, d_out: int, d_in: int) -> int:
    """Multiply-adds per token (tokens x layer) of ``codec.encode`` in store/codecs/."""
    kind, k = parse(codec)
    if kind == "dense":
        return d_out * d_in  # einsum bto,bti->boi
    if kind == "lowrank":
        cols = min(k, d_out, d_in) + OVERSAMPLE
        applies = 1 + 2 * POWER_ITERATIONS + 1  # G Ω, (Gᵀ, G) per iteration, final Gᵀ
        return applies * cols * (d_out + d_in)  # each apply: T·cols·(d_out + d_in)
    k_out, k_in = min(k, d_out), min(k, d_in)
    return k_out * d_out + k_in * d_in + k_out * k_in  # project s and a, then one product


# ---------------------------------------------------------------------------------------------
# Section bytes: the formulas against real stores


def tiny_models() -> dict[str, torch.nn.Module]:
    """A Llama-style and a GPT-2 model, random init, 2 blocks: MLP shapes that clip K and R."""
    llama = tf.LlamaConfig(
        vocab_size=300,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    gpt2 = tf.GPT2Config(
        n_layer=2,
        n_embd=24,
        n_head=2,
        vocab_size=300,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    out = {}
    for name, config in (("llama", llama), ("gpt2", gpt2)):
        torch.manual_seed(0)
        out[name] = tf.AutoModelForCausalLM.from_config(config).float().eval()
    return out


BYTES_CODECS = (
    "dense",
    "kron:8",
    "kron:32",
    "kron:128",
    "eig:8",
    "eig:32",
    "lowrank:4",
    "lowrank:30",
)


def dataset_bytes(store: ik.GradientStore) -> tuple[int, int, int]:
    """(logical, allocated, whole files) bytes of the store's parts."""
    logical = allocated = files = 0
    for path in store.part_paths():
        files += path.stat().st_size
        with h5py.File(path, "r") as f:
            for group in f["layers"].values():
                for ds in group.values():
                    logical += ds.size * ds.dtype.itemsize
                    allocated += ds.id.get_storage_size()
    return logical, allocated, files


def manifest_bytes(store: ik.GradientStore) -> int:
    with h5py.File(store.path, "r") as f:
        return sum(ds.size * ds.dtype.itemsize for g in f["layers"].values() for ds in g.values())


def section_bytes(root: Path) -> bool:
    tok = build_tokenizer(TINY_CORPUS)
    train = ik.TextDataset.from_texts(TINY_CORPUS, tok, max_length=32)
    n = len(train)
    print(f"## bytes: formula vs store ({n} sequences, max_length 32, {n_tokens(train)} tokens)")
    print()
    head = (
        f"{'model':6} {'codec':10} {'shapes':28} {'fp16':>6} {'fp32':>6} {'fp64':>6}  "
        f"{'store':>5} {'parts':>5}  {'alloc fp32':>10} {'file fp32':>9}  "
        f"{'manifest':>8} {'check':>5}"
    )
    print(head)
    print("-" * len(head))
    ok = True
    for name, model in tiny_models().items():
        layers = ik.select_modules(model, "mlp")
        shapes = [layer.grad_shape for layer in layers]
        factors = ik.fit_factors(model, train, "mlp", **QUIET)
        for codec in BYTES_CODECS:
            formula = {dt: bytes_per_example(codec, shapes, dt) for dt in ITEMSIZE}
            same_store = same_parts = True
            alloc = file = 0.0
            for dtype in ITEMSIZE:
                path = root / f"{name}-{codec.replace(':', '-')}-{dtype}.h5"
                store = ik.GradientStore.build(
                    path, model, train, codec=codec, dtype=dtype, factors=factors, **QUIET
                )
                logical, allocated, files = dataset_bytes(store)
                same_store &= store.gradient_bytes() == formula[dtype]
                same_parts &= logical == formula[dtype] * n
                if dtype == "float32":
                    alloc, file = allocated / n, files / n
                    man = manifest_bytes(store)
            man_formula = 8 * sum(manifest_elements(codec, o, i) for o, i in shapes)
            good = same_store and same_parts and man == man_formula
            ok &= good
            print(
                f"{name:6} {codec:10} {shape_text(shapes):28} {formula['float16']:>6} "
                f"{formula['float32']:>6} {formula['float64']:>6}  {yes(same_store):>5} "
                f"{yes(same_parts):>5}  {alloc:>10.0f} {file:>9.0f}  {man:>8} "
                f"{'pass' if good else 'FAIL':>5}"
            )
    print()
    print(
        "fp16/fp32/fp64: formula bytes per example; store: == store.gradient_bytes() for all "
        "three dtypes; parts: == logical bytes of the part files' /layers datasets / n; alloc, "
        "file: allocated dataset bytes and whole part-file bytes per example (fp32 store); "
        "manifest: bytes of the manifest's codec tensors (== its formula under check)."
    )
    print()
    return check_performance_md() and ok


# The bytes/ex columns of docs/performance.md (float32 stores): GPT-2 n_embd=384, 6 blocks, and
# the shipped demo model "small" (n_embd=128, 4 blocks); MLP c_fc and c_proj with bias.
PERFORMANCE_MD = {
    "gpt2 384 x 6": (
        [(1536, 385), (384, 1537)] * 6,
        {
            "dense": 28_357_632,
            "kron:64": 196_608,
            "kron:128": 786_432,
            "eig:64": 196_608,
            "eig:128": 786_432,
            "lowrank:4": 368_832,
            "lowrank:8": 737_664,
            "lowrank:16": 1_475_328,
        },
    ),
    "demo small": (
        [(512, 129), (128, 513)] * 4,
        {
            "dense": 2_107_392,
            "kron:64": 131_072,
            "kron:128": 524_288,
            "eig:64": 131_072,
            "eig:128": 524_288,
            "lowrank:4": 82_048,
            "lowrank:8": 164_096,
            "lowrank:16": 328_192,
        },
    ),
}


def check_performance_md() -> bool:
    ok = True
    for model, (shapes, published) in PERFORMANCE_MD.items():
        wrong = {
            codec: (value, bytes_per_example(codec, shapes, "float32"))
            for codec, value in published.items()
            if bytes_per_example(codec, shapes, "float32") != value
        }
        ok &= not wrong
        print(
            f"docs/performance.md bytes/ex, {model}: {len(published) - len(wrong)} of "
            f"{len(published)} codecs equal the formula" + (f"; differ: {wrong}" if wrong else "")
        )
    print()
    return ok


def n_tokens(train: ik.TextDataset) -> int:
    return sum(len(ex.input_ids) for ex in train)


def shape_text(shapes) -> str:
    return " ".join(f"{o}x{i}" for o, i in shapes[:3]) + (" .." if len(shapes) > 3 else "")


def yes(flag: bool) -> str:
    return "yes" if flag else "NO"


# ---------------------------------------------------------------------------------------------
# Section commit: manifest rewrite and open, per part


def section_commit(root: Path) -> float:
    print("## commit: one manifest write against the number of parts")
    print()
    config = StoreConfig(
        codec="lowrank:8",
        dtype="float16",
        seed=0,
        modules=["layer"],
        shapes=[[4, 4]],
        model_fingerprint="m",
        weights_fingerprint="w",
        tokenizer_fingerprint="t",
        max_length=8,
    )
    per_part = 0.0
    for parts in (1_000, 10_000, 40_000):
        manifest = Manifest(config, "uuid", 8, [{}], [{}], [8] * parts)
        path = root / f"manifest-{parts}.h5"
        best = min(timed(lambda m=manifest, p=path: write_manifest(p, m)) for _ in range(3))
        per_part = best / parts
        print(
            f"  {parts:>6} parts: write {best:7.3f} s  ({best / parts * 1e6:5.1f} us per part), "
            f"{path.stat().st_size:>9,} bytes"
        )
    tok = build_tokenizer(TINY_CORPUS)
    train = ik.TextDataset.from_texts(TINY_CORPUS, tok, max_length=32)
    model = tiny_models()["gpt2"]
    path = root / "one-per-part.h5"
    ik.GradientStore.build(path, model, train, codec="kron:8", part_size=1, **QUIET)
    best = min(timed(lambda: ik.GradientStore.open(path)) for _ in range(3))
    print(
        f"  GradientStore.open, {len(train)} parts: {best:.3f} s "
        f"({best / len(train) * 1e3:.2f} ms per part)"
    )
    print()
    return per_part


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Section eigh: the fit's fixed cost


def section_eigh(sizes: list[int]) -> dict[int, float]:
    print(f"## eigh: float64 torch.linalg.eigh on the CPU, {torch.get_num_threads()} threads")
    print()
    out = {}
    gen = torch.Generator().manual_seed(0)
    for n in sizes:
        x = torch.randn(n, n, generator=gen, dtype=torch.float64)
        matrix = x @ x.T / n
        out[n] = min(timed(lambda m=matrix: torch.linalg.eigh(m)) for _ in range(2))
        print(f"  n = {n:>5}: {out[n]:7.2f} s   (s / n^3 = {out[n] / n**3 * 1e9:.3f} ns)")
    big = max(out)
    for n in (2048, 8192):
        if n not in out:
            print(f"  n = {n:>5}: {out[big] * (n / big) ** 3:7.1f} s   (n^3 from n = {big})")
    print()
    return out


# ---------------------------------------------------------------------------------------------
# Section read: GradientStore.blocks() throughput, one process, page cache warm


def section_read(root: Path) -> None:
    from engine import FULL, build_data, build_model

    print("## read: GradientStore.blocks() of one process, page cache warm")
    print()
    model = build_model(FULL, torch.device("cpu"))
    for codec, count in (("lowrank:8", 256), ("kron:64", 256), ("dense", 16)):
        train, _ = build_data(dataclasses.replace(FULL, n_sequences=count))
        path = root / f"read-{codec.replace(':', '-')}.h5"
        store = ik.GradientStore.build(path, model, train, codec=codec, **QUIET)
        total = len(store) * store.bytes_per_example()

        def read_all(s=store):
            for _ in s.blocks():
                pass

        read_all()  # warm the page cache
        best = min(timed(read_all) for _ in range(3))
        print(
            f"  {codec:10} {len(store):>4} sequences, {total / 1e6:7.1f} MB: {best:6.3f} s, "
            f"{total / best / 1e9:5.2f} GB/s"
        )
    print()


# ---------------------------------------------------------------------------------------------
# Section example: the worked example of docs/scaling.md

# The model: Llama-3.2-1B's shape (16 blocks, hidden 2048, MLP 8192, 32 heads, 8 KV heads,
# vocabulary 128256, tied embeddings, no biases). modules="mlp": gate, up, down per block.
BLOCKS, HIDDEN, MLP, KV, VOCAB = 16, 2048, 8192, 512, 128_256
SHAPES = [(MLP, HIDDEN), (MLP, HIDDEN), (HIDDEN, MLP)] * BLOCKS
N_SEQ, SEQ_LEN, GPUS = 10_000_000, 512, 8
QUERIES, QUERY_RANK, REFINE, TOP_K = 32, 16, 100, 100
QUERY_TOKENS = 32  # prompt + completion tokens per query
FIT_SEQ = 100_000  # fit_factors(..., max_examples=FIT_SEQ)
# ASSUMPTIONS (not measured here: this project has no GPU)
TOKENS_PER_S = 40_000  # forward+backward of the 1.2B model per GPU, bf16 autocast, H100-class
FP32_FLOPS = 40e12  # sustained float32 matmul per GPU (the kit's accumulators are float32)
READ_BW = 2e9  # bytes/s of store read per rank (its own NVMe or its share of a parallel FS)
ALLREDUCE_BW = 100e9  # NCCL bus bandwidth per GPU, bytes/s (NVLink-class)
EXAMPLE_CODECS = (
    "dense",
    "kron:64",
    "eig:64",
    "eig:256",
    "lowrank:1",
    "lowrank:2",
    "lowrank:8",
)


def n_params() -> int:
    attn = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV
    block = attn + 3 * HIDDEN * MLP + 2 * HIDDEN
    return VOCAB * HIDDEN + BLOCKS * block + HIDDEN


def section_example(commit_s: float | None, eigh: dict[int, float] | None) -> None:
    params = n_params()
    tokens = N_SEQ * SEQ_LEN
    tracked = sum(o * i for o, i in SHAPES)
    sq = sum(o * o + i * i for o, i in SHAPES)
    print("## example: Llama-style 1B, modules='mlp'")
    print()
    print(
        f"  model {params / 1e9:.3f}B parameters; {len(SHAPES)} tracked layers "
        f"(gate/up {MLP}x{HIDDEN}, down {HIDDEN}x{MLP}), {tracked / 1e6:.1f}M tracked weights"
    )
    print(f"  data {N_SEQ:,} sequences x {SEQ_LEN} tokens = {tokens:.3e} tokens; {GPUS} GPUs")
    print(
        f"  ASSUMED: {TOKENS_PER_S:,} tokens/s fwd+bwd per GPU "
        f"(= {6 * params * TOKENS_PER_S / 1e12:.0f} TFLOP/s at 6 FLOP per parameter and token), "
        f"{FP32_FLOPS / 1e12:.0f} TFLOP/s fp32, {READ_BW / 1e9:.0f} GB/s read per rank, "
        f"{ALLREDUCE_BW / 1e9:.0f} GB/s all-reduce bus bandwidth"
    )
    print()
    # Fit
    fit_tokens = FIT_SEQ * SEQ_LEN
    pass1 = 2 * sq  # FLOP per token: A += aᵀa, S += sᵀs
    pass2 = 2 * (sq + tracked)  # rotate a and s, then (Q_Sᵀ G Q_A) per sequence
    model_s = 2 * fit_tokens / (GPUS * TOKENS_PER_S)
    algebra_s = (pass1 + pass2) * fit_tokens / (GPUS * FP32_FLOPS)
    factor_bytes = 4 * sum(o * o + i * i + o + i + o * i for o, i in SHAPES)
    ring = 2 * (GPUS - 1) / GPUS
    print(f"  fit on {FIT_SEQ:,} sequences ({fit_tokens:.3e} tokens):")
    print(f"    two capture passes: {model_s:8.0f} s on {GPUS} GPUs")
    print(
        f"    curvature algebra, fp32: pass 1 {pass1 / 1e9:.2f} + pass 2 {pass2 / 1e9:.2f} "
        f"GFLOP per token -> {algebra_s:8.0f} s on {GPUS} GPUs"
    )
    print(
        f"    all-reduce: A,S {4 * sq / 1e9:.1f} GB + Λ {4 * tracked / 1e9:.1f} GB (float32) "
        f"-> {ring * 4 * (sq + tracked) / ALLREDUCE_BW:.2f} s"
    )
    print(
        f"    device accumulators: pass 1 {4 * sq / 1e9:.1f} GB, pass 2 "
        f"{4 * (sq + tracked) / 1e9:.1f} GB (bases + Λ); factors file (float32) "
        f"{factor_bytes / 1e9:.1f} GB"
    )
    print(
        "    eigendecompositions: "
        f"{sum(1 for o, i in SHAPES for d in (o, i) if d == MLP)} of n = {MLP}, "
        f"{sum(1 for o, i in SHAPES for d in (o, i) if d == HIDDEN)} of n = {HIDDEN} "
        "(float64, CPU: see the eigh section)"
    )
    if eigh:
        big = max(eigh)
        cost = sum(eigh.get(d, eigh[big] * (d / big) ** 3) for o, i in SHAPES for d in (o, i))
        print(f"      at this machine's eigh times: {cost:,.0f} s in one process")
    capture_bytes = 8 * SEQ_LEN * sum(o + i for o, i in SHAPES) * 4
    print(f"    captured a, s per batch of 8 x {SEQ_LEN} tokens: {capture_bytes / 1e9:.2f} GB")
    print()
    # Build and score, per codec and dtype
    build_s = tokens / (GPUS * TOKENS_PER_S)
    seq_per_s = N_SEQ / build_s
    print(
        f"  build: capture {build_s:,.0f} s = {build_s / 3600:.1f} h on {GPUS} GPUs "
        f"({seq_per_s:,.0f} sequences/s); score: one query batch of {QUERIES} queries, "
        f"query_rank={QUERY_RANK}"
    )
    print()
    head = (
        f"{'codec':10} {'fp16 MB/seq':>11} {'fp16 TB':>8} {'fp32 TB':>8} "
        f"{'encode GF/tok':>13} {'encode s':>8} {'write GB/s':>10} {'read h':>7} "
        f"{'contract GMAC/seq':>17} {'path':>8} {'contract s':>10} {'part':>5} {'parts':>9}"
        f"{'' if commit_s is None else ' ' + format('manifest s', '>12')}"
    )
    print(head)
    print("-" * len(head))
    for codec in EXAMPLE_CODECS:
        b16 = bytes_per_example(codec, SHAPES, "float16")
        b32 = bytes_per_example(codec, SHAPES, "float32")
        encode = 2 * sum(encode_macs_per_token(codec, o, i) for o, i in SHAPES)
        read_h = N_SEQ * b16 / (GPUS * READ_BW) / 3600
        macs = [contraction_macs(codec, o, i, QUERIES, QUERY_RANK) for o, i in SHAPES]
        per_seq = sum(m for m, _ in macs)
        paths = "/".join(sorted({p for _, p in macs}))
        contract_s = 2 * per_seq * N_SEQ / (GPUS * FP32_FLOPS)
        part = max(1, min(MAX_PART_SIZE, PART_BYTES // b16))  # the default part_size
        parts = -(-N_SEQ // part)
        # every commit rewrites the manifest, which lists every part: c·P²/2 in one process
        manifest = "" if commit_s is None else f" {commit_s * parts**2 / 2:>12,.0f}"
        encode_s = encode * tokens / (GPUS * FP32_FLOPS)
        write = seq_per_s * b16 / 1e9
        print(
            f"{codec:10} {b16 / 1e6:>11.3f} {N_SEQ * b16 / 1e12:>8.2f} {N_SEQ * b32 / 1e12:>8.2f} "
            f"{encode / 1e9:>13.3f} {encode_s:>8,.0f} {write:>10.2f} {read_h:>7.2f} "
            f"{per_seq / 1e9:>17.3f} {paths:>8} {contract_s:>10,.1f} {part:>5} {parts:>9,}"
            f"{manifest}"
        )
    print()
    print(
        "fp16 MB/seq: bytes per sequence (formula); TB: whole store; encode GF/tok: codec "
        "FLOP per token on top of the capture (fp32); encode s: for the whole build at the "
        "assumed fp32 rate on all GPUs; write GB/s: what the build writes, all ranks together, "
        "fp16; read h: one pass over the fp16 store at the assumed read "
        "bandwidth, all ranks; contract: multiply-adds per stored sequence for the query batch, "
        "and seconds at the assumed fp32 rate on all GPUs; part: the default part_size "
        "(examples per part, about 64 MiB) of an fp16 store; parts: parts of one process's "
        "store; manifest s: the sum of the manifest rewrites of one process's build at the "
        "cost per listed part measured in the commit section."
    )
    # Query side, once per batch (scoring.py, factors.py, lowrank.py): rotate each query's
    # tokens into the eigenbases and form its gradient there, then either rotate the dense
    # P_q back or take the rank-r truncation through the Gram matrix of the narrower side
    # and rotate r vectors back.
    rotate = QUERY_TOKENS * (sq + tracked)  # s Q_S, a Q_A, then (Q_Sᵀ G Q_A) per query
    dense_back = sum(o * i * (o + i) for o, i in SHAPES)
    truncated = sum(
        max(o, i) * min(o, i) ** 2 + QUERY_RANK * (o * i + o * o + i * i) for o, i in SHAPES
    )
    narrow = ", ".join(str(n) for n in sorted({min(o, i) for o, i in SHAPES}))
    for name, macs in (("dense P_q", rotate + dense_back), ("rank-r P_q", rotate + truncated)):
        flop = 2 * macs * QUERIES
        print(
            f"query side, {name}: {flop / 1e12:.0f} TFLOP for {QUERIES} queries of "
            f"{QUERY_TOKENS} tokens ({flop / FP32_FLOPS:.0f} s at the assumed fp32 rate, one GPU)"
        )
    print(
        f"  plus, for rank r, {QUERIES * len(SHAPES)} eigendecompositions of n = {narrow} "
        "(one per query and layer, in the query's dtype on its device)"
    )
    full = 8 * QUERIES * N_SEQ * len(SHAPES)
    keep = 8 * QUERIES * TOP_K * len(SHAPES)
    print(
        f"scores kept: all (top_k=None) {full / 1e9:.0f} GB float64; top_k={TOP_K}: "
        f"{keep / 1e6:.1f} MB. refine={REFINE}: at most {QUERIES * REFINE:,} sequences "
        f"recomputed ({QUERIES * REFINE * SEQ_LEN / TOKENS_PER_S:.0f} s of capture on one GPU)"
    )
    print()
    if commit_s is not None:
        part_table(commit_s)
    budget_table()


def part_table(commit_s: float, codec: str = "lowrank:8", dtype: str = "float16") -> None:
    """Parts, manifest rewrites and host memory of one part in flight, against part_size."""
    disk = bytes_per_example(codec, SHAPES, dtype)
    compute = bytes_per_example(codec, SHAPES, "float32")  # encode() fills float32 arrays
    default = max(1, min(MAX_PART_SIZE, PART_BYTES // disk))
    print(f"part_size for {codec} {dtype} ({disk / 1e6:.2f} MB per sequence):")
    head = (
        f"  {'part_size':>10} {'parts':>10} {'manifest s, 1 process':>22} "
        f"{'per rank, 8 shards':>18} {'part GB':>8} {'host GB in flight':>17}"
    )
    print(head)
    for size in (default, 64, 256, 1024):
        parts = -(-N_SEQ // size)
        shard = -(-parts // GPUS)
        # float32 arrays from encode(), their cast to the store dtype, the in-memory HDF5 image
        flight = size * (compute + 2 * disk)
        print(
            f"  {size:>10} {parts:>10,} {commit_s * parts**2 / 2:>22,.0f} "
            f"{commit_s * shard**2 / 2:>18,.0f} {size * disk / 1e9:>8.2f} {flight / 1e9:>17.1f}"
        )
    print()


def budget_table(dtype: str = "float16") -> None:
    """The largest R and K whose store fits a budget, all MLP layers or down_proj only."""
    size = ITEMSIZE[dtype]
    down = [(HIDDEN, MLP)] * BLOCKS
    print(f"largest size per {dtype} store budget ({N_SEQ:,} sequences):")
    print(
        f"  {'budget TB':>9} {'MB/seq':>7} {'lowrank R':>9} {'kron/eig K':>10} "
        f"{'down_proj only: R':>17} {'K':>5}"
    )
    for budget in (4e12, 10e12, 20e12, 80e12):
        per_seq = budget / N_SEQ
        row = []
        for shapes in (SHAPES, down):
            r = int(per_seq // (size * sum(o + i for o, i in shapes)))
            k = int((per_seq / (size * len(shapes))) ** 0.5)
            k = min(k, min(min(o, i) for o, i in shapes))  # K x K while K <= both sides
            assert bytes_per_example(f"lowrank:{max(r, 1)}", shapes, dtype) <= per_seq or r == 0
            assert bytes_per_example(f"kron:{k}", shapes, dtype) <= per_seq
            row += [r, k]
        print(
            f"  {budget / 1e12:>9.0f} {per_seq / 1e6:>7.2f} {row[0] or '-':>9} {row[1]:>10} "
            f"{row[2] or '-':>17} {row[3]:>5}"
        )
    print()


# ---------------------------------------------------------------------------------------------
# Section codecs: the default choice at real widths


WIDTHS = {  # MLP gradient shapes (d_out, d_in; a bias adds an input column) and parameters
    "GPT-2 small": ([(3072, 769), (768, 3073)] * 12, 124e6),
    "Llama-3.2-1B": (SHAPES, 1.236e9),
    "Llama-3-8B": ([(14336, 4096), (14336, 4096), (4096, 14336)] * 32, 8.03e9),
}
SCORE_QUERIES = 8  # a query batch, for the query-side memory and contraction


def window_encode_macs_per_token(d_out: int, d_in: int) -> int:
    """``sparse`` encode, store/codecs/sparse.py, at most: rotating a token's ``s`` and
    ``a`` into the window costs at most one forward of the layer (``WINDOW_COST``), and
    forming ``G̃`` within the window at most ``d_out·d_in`` more (the whole basis); the top-k
    selection is a pass per sequence, not counted."""
    return 2 * d_out * d_in


def layer_choices(share: int, shape: tuple[int, int], tokens: int) -> list[str]:
    """The candidates a layer gets for ``share`` bytes (store/budget.py), without factors:
    positions among the whole layer, the most a sparse codec's positions cost."""
    return [str(c.spec) for c in candidates(
        share, shape, dtype="float16", explicit_dtype=False, longest=tokens, seed=0,
        layer_index=0,
    )]  # fmt: skip


def section_codecs() -> None:
    """What each layer of the default store and of a 128 KiB store can keep, and its costs,
    per model."""
    print("## codecs: the default store at real widths, modules='mlp' (formulas)\n")
    header = (
        f"{'model':<13} {'layers':>6} {'default':>9} {'per layer':>9} {'candidates':>24} "
        f"{'kept':>6} {'128KiB: per layer':>17} {'candidates':>22} {'kept':>6} "
        f"{'encode/fwd+bwd':>14} {'query GB':>8} {'contract':>9}"
    )
    print(header)
    tokens = 512
    for name, (shapes, params) in WIDTHS.items():
        budget = default_budget(shapes)
        largest = max(o * i for o, i in shapes)
        big = max(shapes, key=lambda s: s[0] * s[1])
        share = min(budget // len(shapes), LAYER_CAP)
        found = layer_choices(share, big, tokens)
        small_share = shares(131072 - 1024, [largest] * len(shapes))[0]  # ~1 KiB besides
        small = layer_choices(small_share, big, tokens)

        def kept(specs: list[str], largest: int = largest) -> str:
            sparse = [int(c.split(":")[1]) for c in specs if c.startswith("sparse")]
            return f"{sparse[0] / largest:.3%}" if sparse else "-"

        fwd_bwd = 6 * params / 2  # multiply-adds per token of a forward+backward
        encode = sum(window_encode_macs_per_token(o, i) for o, i in shapes)
        query_gb = SCORE_QUERIES * largest * 4 / 1e9
        k = max((int(c.split(":")[1]) for c in found if c.startswith("sparse")), default=0)
        contract = SCORE_QUERIES * k * len(shapes)
        print(
            f"{name:<13} {len(shapes):>6} {budget / 2**20:>7.2f}Mi {share:>9,} "
            f"{'/'.join(found) or 'refused':>24} {kept(found):>6} {small_share:>17,} "
            f"{'/'.join(small) or 'refused':>22} {kept(small):>6} "
            f"{encode / fwd_bwd:>13.2f}x {query_gb:>8.2f} {contract / 1e6:>7.1f}M"
        )
    print(
        f"\ndefault: the default store's gradient bytes per sequence (per layer what lowrank:8 "
        f"takes in float32, at most {LAYER_CAP:,} bytes); per layer: the largest layer's share; "
        f"candidates: what the build's probe chooses between for it (sparse8 with positions "
        f"among the whole layer: a window makes them cheaper); kept: K over the layer's "
        f"d_out·d_in entries; 128KiB: the same for budget='128KiB' (about 1 KiB per sequence "
        f"besides the gradients); encode/fwd+bwd: the sparse encode's fp32 multiply-adds per "
        f"token over a forward+backward's (3 per parameter and token), at most; query GB: "
        f"{SCORE_QUERIES} dense float32 queries in the eigenbasis of the largest layer (what "
        f"scoring a sparse store holds per layer; groups of layers fill max_memory); contract: "
        f"multiply-adds per stored sequence for {SCORE_QUERIES} queries against sparse8.\n"
    )


SECTIONS = ("bytes", "commit", "eigh", "read", "example", "codecs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections, comma-separated")
    parser.add_argument("--eigh-sizes", default="1024,2048,4096", help="matrix sizes n")
    parser.add_argument(
        "--probe",
        choices=("1b",),
        default=None,
        help="instead: fit, build and score Llama-3.2-1B-shaped models of 1 and 2 blocks, each "
        "stage in its own process, at the defaults and max_memory='2GiB' (benchmarks/widths.py)",
    )
    args = parser.parse_args(argv)
    if args.probe:
        from widths import main as widths_main

        return widths_main(["--blocks", "1,2", "--settings", "default,2GiB"])
    chosen = args.only.split(",")
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    print(
        f"torch {torch.__version__} | h5py {h5py.__version__} | {torch.get_num_threads()} "
        f"threads | numpy {np.__version__}"
    )
    print()
    ok = True
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        if "bytes" in chosen:
            ok = section_bytes(root)
        commit_s = None
        if "commit" in chosen:
            commit_s = section_commit(root)
        eigh = None
        if "eigh" in chosen:
            eigh = section_eigh([int(n) for n in args.eigh_sizes.split(",")])
        if "read" in chosen:
            section_read(root)
    if "example" in chosen:
        section_example(commit_s, eigh)
    if "codecs" in chosen:
        section_codecs()
    if not ok:
        print("FAIL: a formula differs from the store (see the bytes table)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
