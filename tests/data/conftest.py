"""Fixtures shared by the data tests."""

import pytest

from balcap_jax.models.qwen2_5_vl.processor import load_tokenizer


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The packaged Qwen BPE tokenizer (loads in seconds: share it). Tests that add tokens must copy it."""
    return load_tokenizer()
