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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_device_is_refused():
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        resolve_device("cuda")


def test_load_defaults_to_auto():
    model = vstream.load("tiny")
    assert model.device.type == resolve_device("auto").type
