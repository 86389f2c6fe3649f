"""Shared fixtures: one thread, the names data set (found as the product finds it), small word lists."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backprop_ninja.data import DATA_ENV, NAMES_FILE
from backprop_ninja.threads import torch_threads


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs tiny tensors on one thread: with two, OpenMP's hand-offs dominate, and on a
    loaded machine a descheduled worker thread can make a step 100x slower (docs/speed.md)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def names_path() -> Path:
    """names.txt from $BACKPROP_NINJA_DATA (the Makefile and .ci/run point it at ../shared/data)."""
    folder = os.environ.get(DATA_ENV)
    if not folder or not (Path(folder) / NAMES_FILE).is_file():
        pytest.skip(f"names.txt not found: set {DATA_ENV} to the folder that holds it")
    return Path(folder) / NAMES_FILE


@pytest.fixture
def write_words(tmp_path):
    """write_words(["emma", "ava"]) -> path of a word list in tmp_path."""

    def write(words: list[str], name: str = "words.txt") -> Path:
        path = tmp_path / name
        path.write_text("\n".join(words) + "\n", encoding="utf-8")
        return path

    return write
