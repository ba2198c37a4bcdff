"""Device names: `auto` is the default of every entry point and means CUDA when torch sees one."""

import pytest
import torch

import vstream
from vstream.devices import resolve_device


def test_auto_is_cuda_when_present_else_cpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device() == resolve_device("auto")


@pytest.mark.parametrize("name", ["tpu", "", "meta", "cuda:x"])
def test_unknown_device_names_are_refused_with_the_expected_forms(name):
    with pytest.raises(ValueError, match=f"auto .*cpu, cuda or cuda:N; got {name!r}"):
        resolve_device(name)


def test_a_cuda_device_that_is_not_there_is_refused():
    absent = f"cuda:{torch.cuda.device_count()}"  # one past the last device (cuda:0 on a machine without CUDA)
    with pytest.raises(ValueError, match="torch sees (no CUDA device|\\d+ CUDA device)"):
        resolve_device(absent)


def test_load_defaults_to_auto():
    model = vstream.load("tiny")
    assert model.device.type == resolve_device("auto").type
