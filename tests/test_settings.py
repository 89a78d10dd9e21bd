"""``RunSettings``: validated once, canonical forms, the model's device."""

from __future__ import annotations

import pytest
import torch

import influencekit as ik
from influencekit.settings import RunSettings


def test_names_become_dtypes_and_devices():
    run = RunSettings(batch_size=3, device="cpu", dtype="float64", amp_dtype="bfloat16")
    assert (run.batch_size, run.device, run.dtype, run.amp_dtype) == (
        3,
        torch.device("cpu"),
        torch.float64,
        torch.bfloat16,
    )
    assert RunSettings() == RunSettings(8, None, torch.float32, None, True)


@pytest.mark.parametrize(
    ("field", "value"),
    [("batch_size", 0), ("dtype", torch.float16), ("amp_dtype", torch.float32),
     ("device", "nowhere"), ("progress", "yes")],
)  # fmt: skip
def test_every_field_is_checked_also_on_replace(field, value):
    with pytest.raises(ik.ParameterError) as err:
        RunSettings(**{field: value})
    assert err.value.parameter == field
    with pytest.raises(ik.ParameterError):
        RunSettings().replace(**{field: value})


def test_on_a_model_takes_its_device():
    model = torch.nn.Linear(2, 2)
    assert RunSettings().on(model).device == torch.device("cpu")
    assert RunSettings(device="cpu").on(model).device == torch.device("cpu")
