"""What the engine decides about the machine, once: ops, dtype, expert handling, and the log of
each load phase."""

from __future__ import annotations

import builtins
import logging

import pytest
import torch

from swallow_stream.engine import config as engine_config
from swallow_stream.engine.config import EngineOptions, resolve_ops
from swallow_stream.errors import InvalidRequestError


def test_cpu_runs_the_torch_ops_and_refuses_triton_outside_the_interpreter(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_ops("auto", cpu) == "torch"
    assert resolve_ops("torch", cpu) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(InvalidRequestError, match="--ops triton: Triton kernels need a CUDA device"):
        resolve_ops("triton", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernel tests run them on CPU tensors
    assert resolve_ops("triton", cpu) == "triton"


def test_a_gpu_without_usable_triton_falls_back_to_torch_with_a_warning(monkeypatch, caplog):
    cuda = torch.device("cuda")
    real_import = builtins.__import__

    def no_triton(name, *a, **kw):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("no triton on this platform")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_triton)
    with caplog.at_level(logging.WARNING, logger="swallow_stream.engine"):
        assert resolve_ops("auto", cuda) == "torch"
    assert "using the torch ops: Triton is not usable here (ImportError: no triton on this platform)" in caplog.text
    with pytest.raises(InvalidRequestError, match="no triton on this platform"):
        resolve_ops("triton", cuda)


def test_an_old_gpu_falls_back_to_torch(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with caplog.at_level(logging.WARNING, logger="swallow_stream.engine"):
        assert resolve_ops("auto", torch.device("cuda")) == "torch"
    assert "Tesla T4 is compute capability 7.5; the kernels need 8.0 or newer" in caplog.text
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_ops("auto", torch.device("cuda")) == "triton"


def test_dtype_default_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(engine_config, "cpu_has_native_bf16", lambda: True)
    assert engine_config.default_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(engine_config, "cpu_has_native_bf16", lambda: False)
    assert engine_config.default_dtype(torch.device("cpu")) == torch.float32
    assert engine_config.default_dtype(torch.device("cuda")) == torch.bfloat16


@pytest.mark.parametrize("native, dtype, experts_dtype", [
    (True, "bfloat16", torch.bfloat16),  # a bf16 product streams half the bytes
    (False, "bfloat16", torch.float32),  # emulated bf16 products are slower than fp32 ones
    (True, "float32", torch.float32),
])
def test_cpu_experts_are_unpacked_in_the_dtype_the_cpu_computes_fastest(monkeypatch, tiny_path, make_engine,
                                                                        native, dtype, experts_dtype):
    from swallow_stream.engine import llm_engine

    monkeypatch.setattr(llm_engine, "cpu_has_native_bf16", lambda: native)
    engine = make_engine(tiny_path, dtype=dtype)
    for layer in engine.runner.model.w.layers:
        assert [t.dtype for t in layer.experts.dequantized] == [experts_dtype] * 2
        assert layer.experts.compute_dtype == experts_dtype


def test_options_are_checked_when_made():
    with pytest.raises(InvalidRequestError, match="unknown ops 'cuda'"):
        EngineOptions(ops="cuda")
    with pytest.raises(InvalidRequestError, match="unknown dtype"):
        EngineOptions(dtype="int4")
    with pytest.raises(InvalidRequestError, match="unknown engine option"):
        EngineOptions.from_kwargs(max_seqs=3)


def test_each_load_phase_is_logged_with_sizes_and_seconds(tiny_path, make_engine, caplog):
    with caplog.at_level(logging.INFO, logger="swallow_stream.engine"):
        make_engine(tiny_path, name="logged")
    lines = [r.getMessage() for r in caplog.records if r.name == "swallow_stream.engine"]
    read, runner, kv, ready = lines[-4:]
    assert read.startswith("read 79 tensors (") and " GiB) from " in read and read.endswith(" s")
    assert runner.startswith("model runner ready in ") and "for the torch ops" in runner and "CUDA graphs off" in runner
    assert kv.startswith("KV cache: ") and "blocks of 16 tokens" in kv and "GiB; max_model_len" in kv
    assert ready == "logged ready"
