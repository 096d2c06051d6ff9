"""`python app.py` / `swallow-stream`: load a backend and serve the app on one port.

Every flag has an environment variable (for Spaces); a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from typing import Any, Sequence

from .settings import Settings

log = logging.getLogger("swallow_stream.server")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'8GiB', '512MiB', '2G', '1073741824' -> bytes (K/M/G/T with or without 'i' are powers of 1024)."""
    m = _SIZE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use bytes, or e.g. 512MiB, 8GiB)")
    num, unit, _ = m.groups()
    scale = 1024 ** " kmgt".index(unit.lower() or " ")
    return int(float(num) * scale)


def _env(*names: str) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            return v
    return None


def _env_int(*names: str) -> int | None:
    v = _env(*names)
    return int(v) if v is not None else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="swallow-stream",
        description="Serve GPT-OSS-Swallow: Gradio UI at /, WebSocket /ws, OpenAI-compatible /v1, /health, /metrics.",
    )
    p.add_argument("--model", default=_env("SWALLOW_MODEL"),
                   help="Hub repo id, local checkpoint dir, or 'tiny'; with --backend openai, the remote model "
                        "name (default: picked by hardware / the remote's first model) [SWALLOW_MODEL]")
    p.add_argument("--host", default=_env("SWALLOW_HOST", "HOST", "GRADIO_SERVER_NAME") or "127.0.0.1",
                   help="bind address (default 127.0.0.1) [SWALLOW_HOST, HOST, GRADIO_SERVER_NAME (set by Spaces)]")
    p.add_argument("--port", type=int, default=_env_int("SWALLOW_PORT", "PORT", "GRADIO_SERVER_PORT") or 7860,
                   help="port (default 7860) [SWALLOW_PORT, PORT, GRADIO_SERVER_PORT]")
    p.add_argument("--api-key", default=_env("SWALLOW_API_KEY"),
                   help="require this key on /ws, /v1/*, /metrics, /health details (Authorization: Bearer; /ws also "
                        "?api_key=) and the UI (a login with the key as password) [SWALLOW_API_KEY]")
    p.add_argument("--backend", choices=["local", "openai"], default=_env("SWALLOW_BACKEND") or "local",
                   help="local engine, or a remote OpenAI-compatible server [SWALLOW_BACKEND]")
    p.add_argument("--base-url", default=_env("SWALLOW_BASE_URL"),
                   help="the remote server for --backend openai, e.g. http://gpu-box:8000/v1 [SWALLOW_BASE_URL]")
    p.add_argument("--remote-api-key", default=_env("SWALLOW_REMOTE_API_KEY"),
                   help="API key sent to the remote server [SWALLOW_REMOTE_API_KEY]")
    p.add_argument("--served-model-name", action="append", default=None,
                   help="extra model name(s) /v1/chat/completions accepts (repeatable) [SWALLOW_SERVED_MODEL_NAME, comma-separated]")
    g = p.add_argument_group("engine limits (local backend)")
    g.add_argument("--max-num-seqs", type=int, default=_env_int("SWALLOW_MAX_NUM_SEQS"),
                   help="max concurrent sequences in a batch (default 16) [SWALLOW_MAX_NUM_SEQS]")
    g.add_argument("--max-queued-requests", type=int, default=_env_int("SWALLOW_MAX_QUEUED_REQUESTS"),
                   help="requests waiting beyond those; more are refused as overloaded (default 64) [SWALLOW_MAX_QUEUED_REQUESTS]")
    g.add_argument("--max-model-len", type=int, default=_env_int("SWALLOW_MAX_MODEL_LEN"),
                   help="max tokens per sequence, prompt + completion (default 32768) [SWALLOW_MAX_MODEL_LEN]")
    g.add_argument("--kv-cache-memory", type=parse_size, default=_env("SWALLOW_KV_CACHE_MEMORY"),
                   help="KV cache size, e.g. 8GiB (default: 0.9 of free GPU memory; 512MiB on CPU) [SWALLOW_KV_CACHE_MEMORY]")
    g.add_argument("--device", default=_env("SWALLOW_DEVICE"), help="cuda / cpu (default: cuda when present) [SWALLOW_DEVICE]")
    g.add_argument("--dtype", default=_env("SWALLOW_DTYPE"),
                   help="bfloat16 / float16 / float32 (default: bf16 on CUDA and on CPUs with native bf16) [SWALLOW_DTYPE]")
    g.add_argument("--ops", choices=["auto", "triton", "torch"], default=_env("SWALLOW_OPS"),
                   help="kernels: Triton where it runs (auto, the default), or the plain-torch ops [SWALLOW_OPS]")
    g.add_argument("--keep-dense-experts", action="store_true", default=_env("SWALLOW_KEEP_DENSE_EXPERTS") is not None,
                   help="keep bf16 experts dense instead of quantizing them to MXFP4 at load [SWALLOW_KEEP_DENSE_EXPERTS]")
    g.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="share of GPU memory the engine plans for (default 0.9) [SWALLOW_GPU_MEMORY_UTILIZATION]")
    g.add_argument("--dry-run", action="store_true",
                   help="print the memory plan (weights, KV cache, activations against the GPU) and exit; "
                        "downloads only config.json and the index")
    g.add_argument("--gpu-memory", type=parse_size, default=None,
                   help="with --dry-run: plan for a GPU of this size (e.g. 24GiB) instead of the one present")
    s = p.add_argument_group("front doors")
    s.add_argument("--ws-max-generations", type=int, default=_env_int("SWALLOW_WS_MAX_GENERATIONS") or 8,
                   help="concurrent generations per WebSocket connection (default 8) [SWALLOW_WS_MAX_GENERATIONS]")
    s.add_argument("--ws-max-frame-bytes", type=parse_size, default=_env("SWALLOW_WS_MAX_FRAME_BYTES") or "1MiB",
                   help="largest client frame accepted (default 1MiB) [SWALLOW_WS_MAX_FRAME_BYTES]")
    s.add_argument("--ws-allowed-origin", action="append", default=None,
                   help="an origin (scheme://host[:port]) whose web pages may open /ws besides this server's own "
                        "and loopback pages; repeatable, '*' for any [SWALLOW_WS_ALLOWED_ORIGINS, comma-separated]")
    s.add_argument("--ui-concurrency", type=int, default=_env_int("SWALLOW_UI_CONCURRENCY"),
                   help="chats the UI runs at once (default: --max-num-seqs) [SWALLOW_UI_CONCURRENCY]")
    p.add_argument("--log-level", default=_env("SWALLOW_LOG_LEVEL") or "info", help="[SWALLOW_LOG_LEVEL]")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if isinstance(args.kv_cache_memory, str):  # from the environment
        args.kv_cache_memory = parse_size(args.kv_cache_memory)
    if args.gpu_memory_utilization is None and _env("SWALLOW_GPU_MEMORY_UTILIZATION"):
        args.gpu_memory_utilization = float(_env("SWALLOW_GPU_MEMORY_UTILIZATION"))
    if isinstance(args.ws_max_frame_bytes, str):
        args.ws_max_frame_bytes = parse_size(args.ws_max_frame_bytes)
    if args.ws_allowed_origin is None:
        env = _env("SWALLOW_WS_ALLOWED_ORIGINS")
        args.ws_allowed_origin = [o.strip() for o in env.split(",") if o.strip()] if env else []
    if args.served_model_name is None:
        env = _env("SWALLOW_SERVED_MODEL_NAME")
        args.served_model_name = [n.strip() for n in env.split(",") if n.strip()] if env else []
    if args.backend == "openai" and not args.base_url:
        build_parser().error("--backend openai needs --base-url (or SWALLOW_BASE_URL)")
    return args


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    opts = {
        "max_num_seqs": args.max_num_seqs,
        "max_queued_requests": args.max_queued_requests,
        "max_model_len": args.max_model_len,
        "kv_cache_memory": args.kv_cache_memory,
        "device": args.device,
        "dtype": args.dtype,
        "ops": args.ops,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "quantize_dense_experts": False if args.keep_dense_experts else None,
    }
    if zero_gpu():
        # The GPU exists only inside spaces.GPU calls: the engine steps there (inline), without
        # CUDA graphs, and its KV budget is given since no device memory can be measured at startup.
        opts.update(inline=True, cuda_graphs=False, device=args.device or "cuda",
                    kv_cache_memory=args.kv_cache_memory or ZERO_GPU_KV_CACHE_MEMORY)
    return {k: v for k, v in opts.items() if v is not None}


ZERO_GPU_KV_CACHE_MEMORY = 4 << 30


def zero_gpu() -> bool:
    """Running on Hugging Face ZeroGPU (spaces/app.py sets SWALLOW_ZERO_GPU there)."""
    return _env("SWALLOW_ZERO_GPU") not in (None, "0", "false")


def gpu_decorator() -> Any:
    if not zero_gpu():
        return None
    import spaces

    return spaces.GPU(duration=int(_env("SWALLOW_ZERO_GPU_DURATION") or 120))


def zero_gpu_startup() -> None:
    """ZeroGPU moves the tensors placed on CUDA at startup into its GPU workers and registers the
    GPU functions from a hook on Gradio's `Blocks.launch`; this server mounts Gradio into its own
    app and never calls launch(), so it runs that startup itself, once the app is built."""
    import spaces.zero

    startup = getattr(spaces.zero, "startup", None)  # defined only when SPACES_ZERO_GPU is set
    if startup is not None:
        startup()


def load_backend(args: argparse.Namespace) -> tuple[Any, str]:
    """-> (backend, model_source) where model_source is "flag" or "auto"."""
    from ..api import load
    from ..catalog import MODEL_20B, auto_model

    if args.backend == "openai":
        b = load(args.model, backend="openai", base_url=args.base_url, api_key=args.remote_api_key)
        return b, "flag" if args.model else "remote"
    source = "flag" if args.model else "auto"
    # ZeroGPU's emulated device reports no memory to plan by: its default is the 20B model
    name = args.model or (MODEL_20B if zero_gpu() else auto_model())
    return load(name, **engine_options(args)), source


def make_settings(args: argparse.Namespace, backend: Any, model_source: str) -> Settings:
    return Settings(
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        served_model_names=tuple(args.served_model_name),
        model_source=model_source,
        ws_max_frame_bytes=args.ws_max_frame_bytes,
        ws_max_generations=args.ws_max_generations,
        ws_allowed_origins=tuple(args.ws_allowed_origin),
        ui_concurrency=args.ui_concurrency,
        ui_max_queue=args.max_queued_requests,
        gpu_decorator=gpu_decorator(),
    )


def dry_run(args: argparse.Namespace) -> int:
    """Print the memory plan for the model on this GPU (or --gpu-memory) -> exit code (0: fits)."""
    from ..catalog import TINY, auto_model
    from ..engine import EngineOptions
    from ..engine.planner import cuda_memory, preflight
    from ..errors import InsufficientMemoryError, SwallowError

    gpu = (args.gpu_memory, f"a {args.gpu_memory / 2**30:.0f} GiB GPU") if args.gpu_memory else cuda_memory()
    if gpu is None:
        print("no CUDA GPU here: the server would serve the tiny model on the CPU "
              "(pass --gpu-memory SIZE to plan for a GPU)")
        return 0
    model = args.model or auto_model(gpu)
    if model == TINY:
        print(f"{gpu[1]}: no Swallow model fits; the server would serve the tiny model")
        return 0
    opts = EngineOptions(**{"device": "cuda", **engine_options(args)})
    try:
        plan = preflight(model, opts, gpu)
    except InsufficientMemoryError as e:
        print(e)
        return 1
    except SwallowError as e:
        print(f"cannot plan for {model}: {e}")
        return 2
    print(plan.table())
    return 0


def create_app(argv: Sequence[str] | None = None):
    """Parse flags, load the backend and build the app: -> (app, settings, backend)."""
    from .app import build_app

    args = parse_args(argv)
    backend, source = load_backend(args)
    settings = make_settings(args, backend, source)
    return build_app(backend, settings), settings, backend


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.dry_run:
        raise SystemExit(dry_run(args))
    from .app import build_app

    backend, source = load_backend(args)
    settings = make_settings(args, backend, source)
    log.info("serving %s (%s backend%s) on http://%s:%d", backend.name, backend.kind,
             ", picked for this hardware" if source == "auto" else "", settings.host, settings.port)
    if backend.is_tiny:
        log.warning("the tiny model has random weights: its output is noise")
    app = build_app(backend, settings)
    if zero_gpu():
        zero_gpu_startup()
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level.lower(),
                ws_max_size=max(settings.ws_max_frame_bytes * 4, 16 << 20), timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
