"""What ``InfluenceCallback`` adds to a ``transformers`` Trainer run.

The same seeded Trainer run (benchmarks/engine.py's GPT-2 and synthetic sequences, AdamW,
linear schedule) twice in this process, without and with the callback saving
``--checkpoints`` times (factors on ``--sample`` sequences each; ``--store`` also builds a
store of the whole training set each time), in alternating order; printed: each run's
seconds, the overhead as a share of the plain run and per save (in training steps: the
overhead of a longer run is the saves' cost over its length), and whether the loss curves
are equal.

Usage:
    python benchmarks/callback.py                  # about 3 minutes on 2 CPU cores
    python benchmarks/callback.py --quick          # smoke run, well under a minute
    python benchmarks/callback.py --steps 600 --checkpoints 4 --sample 512 --store
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/ is not a package

from engine import FULL, QUICK, build_data, build_model

from influencekit.integrations import InfluenceCallback


class Windows(torch.utils.data.Dataset):
    """Each training sequence's tokens cut to one fixed length (the default collator stacks)."""

    def __init__(self, train, length: int) -> None:
        self.rows = [ex.input_ids[:length] for ex in train if len(ex.input_ids) >= length]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        ids = torch.tensor(self.rows[i])
        return {"input_ids": ids, "labels": ids.clone()}


def train_once(setting, train, steps: int, callback, root: Path) -> tuple[float, list[float]]:
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    model = build_model(setting, torch.device("cpu")).train()
    args = TrainingArguments(
        output_dir=str(root),
        max_steps=steps,
        per_device_train_batch_size=setting.batch_size,
        learning_rate=3e-4,
        lr_scheduler_type="linear",
        warmup_steps=steps // 10,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    callbacks = [Losses()] + ([callback] if callback else [])
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Windows(train, setting.max_length // 2),
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # no log line per step
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model and run")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (300; 24)")
    parser.add_argument("--checkpoints", type=int, default=3, help="saves in the run (3)")
    parser.add_argument("--sample", type=int, default=256, help="sequences per fit (256)")
    parser.add_argument("--store", action="store_true", help="also build a store each time")
    args = parser.parse_args(argv)
    setting = QUICK if args.quick else dataclasses.replace(FULL, n_sequences=1024)
    steps = args.steps or (24 if args.quick else 300)
    train, _ = build_data(setting)
    saves = [steps * (c + 1) // args.checkpoints for c in range(args.checkpoints)]
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()}")
    print(f"GPT-2 {setting.n_layer} x {setting.n_embd}; {steps} steps of "
          f"{setting.batch_size} x {setting.max_length // 2} tokens; saves at {saves}, "
          f"factors on {args.sample} sequences, store: {args.store}")  # fmt: skip
    times: dict[str, list[float]] = {"plain": [], "callback": []}
    curves = {}
    with tempfile.TemporaryDirectory() as root:
        for turn, kind in enumerate(["plain", "callback", "callback", "plain"]):
            callback = None
            if kind == "callback":
                callback = InfluenceCallback(
                    train, steps=saves, max_examples=args.sample, store=args.store,
                    folder=Path(root) / f"influence-{turn}",
                )  # fmt: skip
            seconds, losses = train_once(setting, train, steps, callback, Path(root) / str(turn))
            times[kind].append(seconds)
            curves.setdefault(kind, losses)
    plain, with_callback = (sum(times[k]) / len(times[k]) for k in ("plain", "callback"))
    print(
        f"\nplain run     {plain:8.1f} s   (runs: {', '.join(f'{t:.1f}' for t in times['plain'])})"
    )
    print(f"with callback {with_callback:8.1f} s   "
          f"(runs: {', '.join(f'{t:.1f}' for t in times['callback'])})")  # fmt: skip
    print(f"overhead      {100 * (with_callback / plain - 1):8.1f} % of the plain run")
    per_save = (with_callback - plain) / len(saves)
    print(f"per save      {per_save:8.1f} s = {per_save / (plain / steps):.0f} training steps "
          f"(so {len(saves)} saves add {100 * per_save * len(saves) / plain:.0f} % to this "
          f"run, and would add 17 % to a run of "
          f"{per_save * len(saves) / (0.17 * plain / steps):,.0f} steps)")  # fmt: skip
    print(f"loss curves equal: {curves['plain'] == curves['callback']}")


if __name__ == "__main__":
    main()
