"""Device launches per transformer layer in a decode step on the Triton op set (issue #10 item 5:
at most 6 a layer for T <= 128 new tokens, with or without the attention's context split).

A launch is a Triton kernel launch (the JIT / interpreted function's `run`) or a torch op that
would launch a kernel on CUDA (anything but views and allocations: mm/addmm/linear, copies,
fills, index ops, elementwise). Torch ops the Triton interpreter itself runs inside a launch are
not counted. Layers are told apart by marking each step of the model's loop over its layers.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from swallow_stream.checkpoint.synthetic import preset, random_state_dict
from swallow_stream.model import GptOss, ModelWeights
from swallow_stream.ops import get_ops

from swallow_kernels import attention as attention_mod
from test_model_triton import PagedDriver, WINDOW

MAX_LAUNCHES_PER_LAYER = 6

_aten = torch.ops.aten
# Allocations and metadata: no kernel on CUDA (views are recognised by OpOverload.is_view).
_NO_LAUNCH = {_aten.empty.memory_format, _aten.empty_like.default, _aten.empty_strided.default, _aten.detach.default,
              _aten.alias.default, _aten.lift_fresh.default}


class LaunchLog(TorchDispatchMode):
    """Records ("layer", i) marks, ("triton", kernel name) and ("torch", op name) launches."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, str]] = []
        self.in_kernel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_kernel and not func.is_view and func not in _NO_LAUNCH:
            self.events.append(("torch", str(func)))
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def counting_triton(self):
        """Logs each `kernel[grid](...)` launch (compiled or interpreted, any Triton >= 3.4)."""
        import triton.runtime.interpreter as interp
        import triton.runtime.jit as jit

        log = self
        patched = []
        for cls in (interp.InterpretedFunction, jit.JITFunction):
            orig = cls.__getitem__

            def getitem(fn, grid, _orig=orig):
                launch = _orig(fn, grid)
                name = fn.fn.__name__ if hasattr(fn, "fn") else str(fn)

                def counted(*args, **kwargs):
                    log.events.append(("triton", name))
                    log.in_kernel += 1
                    try:
                        return launch(*args, **kwargs)
                    finally:
                        log.in_kernel -= 1

                return counted

            cls.__getitem__ = getitem
            patched.append((cls, orig))
        try:
            yield
        finally:
            for cls, orig in patched:
                cls.__getitem__ = orig

    def per_layer(self) -> list[list[str]]:
        """Launches between consecutive layer marks; the last layer ends at the loop's end mark."""
        layers: list[list[str]] = []
        current = None
        for kind, name in self.events:
            if kind == "mark":
                if current is not None:
                    layers.append(current)
                current = [] if name != "end" else None
            elif current is not None:
                current.append(name)
        return layers


class MarkedLayers(list):
    """The model's layer list; iterating it logs a mark before each layer and after the last."""

    def __init__(self, layers, log: LaunchLog):
        super().__init__(layers)
        self.log = log

    def __iter__(self):
        for i, layer in enumerate(list.__iter__(self)):
            self.log.events.append(("mark", str(i)))
            yield layer
        self.log.events.append(("mark", "end"))


@pytest.fixture(scope="module")
def tiny_model(device):
    cfg = preset("tiny", vocab_size=512, sliding_window=WINDOW)
    weights = ModelWeights.from_state_dict(cfg, random_state_dict(cfg, seed=0), device, torch.float32)
    return GptOss(cfg, weights, get_ops("triton", device.type), max_positions=64)


@pytest.fixture(scope="module")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def decode_launches(model: GptOss, batch: int, context: int) -> tuple[list[list[str]], list[int]]:
    """One decode step of `batch` sequences (one new token each) at `context` tokens already
    cached. -> (launches per layer, the attention's context splits per layer)."""
    drv = PagedDriver(model, batch, context + 1)
    drv.lens = [context] * batch
    drv.step([[1] for _ in range(batch)])  # warm-up: one-time buffers (tickets) allocated here
    drv.lens = [context] * batch
    log = LaunchLog()
    splits: list[int] = []
    orig_cfg = attention_mod.launch_config

    def launch_config(*args, **kwargs):
        cfg = orig_cfg(*args, **kwargs)
        splits.append(cfg["NUM_SPLITS"])
        return cfg

    layers = model.w.layers
    model.w.layers = MarkedLayers(layers, log)
    attention_mod.launch_config = launch_config
    try:
        with log.counting_triton(), log:
            drv.step([[2] for _ in range(batch)])
    finally:
        model.w.layers = layers
        attention_mod.launch_config = orig_cfg
    return log.per_layer(), splits


# The interpreter stands in 4 SMs: a decode batch of 1 or 2 (2 KV heads) splits a 24-token
# context over programs (flash-decoding), 4 and 8 do not.
@pytest.mark.parametrize("batch,split", [(1, True), (2, True), (4, False), (8, False)])
def test_decode_layer_launches_at_most_six(tiny_model, batch, split):
    per_layer, splits = decode_launches(tiny_model, batch, context=23)
    assert len(per_layer) == tiny_model.cfg.num_hidden_layers
    assert splits and all((s > 1) == split for s in splits), splits
    for i, launches in enumerate(per_layer):
        assert "attn_kernel" in launches, launches  # the log sees the layer's launches
        assert len(launches) <= MAX_LAUNCHES_PER_LAYER, f"layer {i}: {len(launches)} launches {launches}"
