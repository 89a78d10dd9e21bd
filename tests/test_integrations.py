"""The Trainer callback: checkpoints saved during a real ``transformers`` Trainer run.

A tiny GPT-2 (with dropout, so that any draw from a shared random generator would show)
trains for 12 steps on CPU under a linear warm-up/decay schedule, with and without
:class:`InfluenceCallback` saving at steps 4, 8 and 12:

1. the loss at every step is bit-identical with and without the callback;
2. each saved ``lr_sum`` equals the scheduler's learning rates summed over the steps since
   the previous checkpoint (recomputed here from a fresh scheduler), and each saved weight
   file equals the weights the run had at that step;
3. ``validate.combine_saved`` equals the learning-rate weighted sum of each checkpoint's
   scores computed by hand from the saved weights and factors, on the fly and from the
   store each checkpoint built (``store=True``).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit.integrations import InfluenceCallback
from influencekit.tiny import TINY_CORPUS
from influencekit.validate import combine_saved, lr_weights, saved_checkpoints

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer's own dependency

STEPS, SAVE_AT, LENGTH = 12, [4, 8, 12], 16
QUERIES = [("The chef tastes the", " soup and adds salt."), ("On a clear night", " stars shine.")]


class Sequences(torch.utils.data.Dataset):
    """Fixed-length token windows: the Trainer's default collator stacks them."""

    def __init__(self, train: ik.TextDataset) -> None:
        self.rows = [list(ex.input_ids[:LENGTH]) for ex in train if len(ex.input_ids) >= LENGTH]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        ids = torch.tensor(self.rows[i])
        return {"input_ids": ids, "labels": ids.clone()}


class Snapshots(transformers.TrainerCallback):
    """Test-only: the weights at the save steps, and the loss of every step."""

    def __init__(self) -> None:
        self.weights, self.losses = {}, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in SAVE_AT:
            self.weights[state.global_step] = copy.deepcopy(model.state_dict())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def new_model(tokenizer):
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=len(tokenizer),
        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def run(tokenizer, train, out, callbacks):
    model = new_model(tokenizer)
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        warmup_steps=3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    snapshots = Snapshots()
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=Sequences(train),
        callbacks=[snapshots, *callbacks],
    )
    trainer.train()
    return model, snapshots


@pytest.fixture(scope="module")
def train(tokenizer):
    return ik.TextDataset.from_texts(TINY_CORPUS, tokenizer, max_length=LENGTH)


@pytest.fixture(scope="module")
def runs(tokenizer, train, tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    _, plain = run(tokenizer, train, root / "plain", [])
    callback = InfluenceCallback(train, steps=SAVE_AT, max_examples=24, store=True)
    model, watched = run(tokenizer, train, root / "watched", [callback])
    return plain, watched, callback, model


def test_the_loss_curve_is_bit_identical_with_the_callback(runs):
    plain, watched, _, _ = runs
    assert len(plain.losses) == STEPS
    assert watched.losses == plain.losses  # exact: not one draw or gradient changed


def test_saved_lr_sums_equal_the_schedulers(runs, tokenizer):
    _, watched, callback, _ = runs
    saved = saved_checkpoints(callback.folder)
    assert [c.step for c in saved] == SAVE_AT
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, 3, STEPS)
    rates = []
    for _ in range(STEPS):  # the rate each step is taken with, then the scheduler's step
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    bounds = [0, *SAVE_AT]
    for c, lo, hi in zip(saved, bounds, bounds[1:], strict=False):
        assert c.lr_sum == pytest.approx(sum(rates[lo:hi]), rel=1e-12, abs=0)
    for c in saved:  # the weights the run had at that step
        loaded = c.load_into(new_model(tokenizer)).state_dict()
        for name, value in watched.weights[c.step].items():
            assert torch.equal(loaded[name], value), (c.step, name)


@pytest.mark.parametrize("stores", [False, True])
def test_combine_saved_is_the_lr_weighted_sum(runs, tokenizer, train, stores):
    _, _, callback, _ = runs
    saved = saved_checkpoints(callback.folder)
    assert all(c.store() is not None for c in saved)
    weights = lr_weights(saved)
    expected = 0
    for w, c in zip(weights, saved, strict=True):
        model = c.load_into(new_model(tokenizer))
        source = c.store() if stores else train
        result = ik.score(model, c.factors(), QUERIES, source, progress=False)
        expected = expected + w * result.layer_scores
    combined = combine_saved(
        new_model(tokenizer), callback.folder, QUERIES, train, stores=stores, progress=False
    )
    np.testing.assert_allclose(combined.layer_scores, expected, rtol=1e-6, atol=1e-9)
    assert [c["weight"] for c in combined.meta["checkpoints"]] == pytest.approx(weights)


def test_combine_saved_from_stores_needs_no_training_set(runs, tokenizer, train):
    _, _, callback, _ = runs
    from_stores = combine_saved(new_model(tokenizer), callback.folder, QUERIES, progress=False)
    exact = combine_saved(
        new_model(tokenizer), callback.folder, QUERIES, train, stores=False, progress=False
    )
    for a, b in zip(from_stores.scores, exact.scores, strict=True):
        assert np.corrcoef(a, b)[0, 1] > 0.95  # each store is compressed (its default codec)
    with pytest.raises(ik.ParameterError, match="train"):
        combine_saved(new_model(tokenizer), callback.folder, QUERIES, stores=False)


def test_callback_needs_somewhere_to_save(train):
    with pytest.raises(ik.ParameterError, match="steps"):
        InfluenceCallback(train)
