"""Fixtures shared by every test: the tiny generated model (GGUF + tokenizer, made once a session).

Tests that start engines use it with the real llama.cpp server (xllamacpp), never a mock.
"""

from __future__ import annotations

import pytest

from servetune.modelgen import ModelFiles, make_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    """The tiny random-weight Llama model (about 15 MB, seed 0), generated once per test session."""
    return make_model("tiny", tmp_path_factory.mktemp("tiny_model"))
