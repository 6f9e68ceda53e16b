"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny local model (``tokenweir model make-tiny``), built once per session.

    Tests using it skip where torch or transformers is not installed.
    """
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    # Test machines are small and shared: torch would otherwise take every core.
    torch.set_num_threads(2)
    from workers.tinymodel import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model")).directory
