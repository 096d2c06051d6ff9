"""The Space's entry point: the same server as `python app.py`, configured by Space variables.

Spaces route traffic to 0.0.0.0:7860. On ZeroGPU hardware (`spaces` installed, SPACES_ZERO_GPU
set) the GPU exists only inside `@spaces.GPU` calls, so the engine runs inline in those calls
(no background engine thread, no CUDA graphs, no torch.compile).
"""

import os

os.environ.setdefault("SWALLOW_HOST", "0.0.0.0")
os.environ.setdefault("SWALLOW_PORT", os.environ.get("PORT", "7860"))

try:  # present on Hugging Face Spaces
    import spaces
except ImportError:
    spaces = None

if spaces is not None and os.environ.get("SPACES_ZERO_GPU"):
    os.environ.setdefault("SWALLOW_ZERO_GPU", "1")

from swallow_stream.server.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
