"""Kernel tests run the Triton kernels on CPU through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before `swallow_kernels` defines its kernels, so it is set here,
at collection, before any test module imports them.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, *, scale: float = 1.0) -> None:
    """Relative-to-magnitude error bound by dtype: bf16 ~1e-2, fp32 ~1e-5 (times `scale`)."""
    a, e = actual.float(), expected.float()
    tol = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype] * scale
    ref = e.abs().max().clamp(min=1e-6)
    err = (a - e).abs().max()
    assert err <= tol * ref, f"max abs err {err.item():.3g} > {tol:.3g} * max|ref| {ref.item():.3g}"


@pytest.fixture
def assert_close():
    return _assert_close
