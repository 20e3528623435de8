"""Replays the fuzzing corpus (tests/fuzz/corpus: the seed inputs, every input the fuzzer kept, and any
input that once failed) through the fuzz target's oracle; the fuzzing itself runs in .ci/run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fuzz"))
import fuzz_api  # noqa: E402

CORPUS = Path(__file__).parent / "fuzz" / "corpus"


def test_corpus_is_there():
    assert len(list(CORPUS.iterdir())) >= 100


def test_replay_corpus():
    failures = []
    for path in sorted(CORPUS.iterdir()):
        try:
            fuzz_api.TestOneInput(path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - collect them all, report each with its file
            failures.append(f"{path.name}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("data", [b"", b"\x01"])
def test_empty_input_is_an_ordinary_valid_call(data):
    """Missing bytes decode to option 0 of every knob: a plain call that must succeed, which keeps the
    fuzzer's starting point meaningful."""
    fn, args, kwargs = fuzz_api.decode(data)
    fn(*args, **kwargs)
