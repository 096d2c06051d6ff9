"""The example notebook runs top to bottom on the tiny model; its outputs hold the live displays."""

import json
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from swallow_stream.checkpoint.synthetic import DEMO_REASONING

from notebook_helpers import Elements

pytestmark = pytest.mark.slow  # executes the quickstart notebook in a kernel

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    work = tmp_path_factory.mktemp("nb")
    shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
    nb = nbformat.read(work / NOTEBOOK.name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
    return nb


def outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            raise AssertionError(f"{out['ename']}: {out['evalue']}")
        parts.append(out.get("text", ""))
        parts.append(json.dumps(out.get("data", {}), ensure_ascii=False))
    return "".join(parts)


def stream_displays(cell) -> list[dict]:
    """The cell's stream displays (each updated in place to its final rendering by nbclient)."""
    return [o for o in cell.get("outputs", []) if o.get("output_type") == "display_data"
            and 'class="swallow-stream"' in o.get("data", {}).get("text/html", "")]


def rendered(out) -> Elements:
    assert out["data"]["text/plain"]  # a plain-text fallback in every bundle
    return Elements(out["data"]["text/html"])


def test_notebook_runs_and_renders_streams(executed):
    code = [c for c in executed.cells if c.cell_type == "code"]
    texts = [outputs_text(c) for c in code]  # raises on any error output
    assert all(c.get("execution_count") for c in code)
    assert "tiny" in texts[0]
    assert "Traceback" not in "\n".join(texts)

    # Evaluating a stream: one output, in its final state. The reasoning block is closed (the
    # answer has started), the answer is rendered Markdown, and the stats line is there.
    (shown,) = stream_displays(code[2])
    el = rendered(shown)
    (details,) = el.by_class("swallow-reasoning")
    assert details["tag"] == "details" and "open" not in details["attrs"]
    assert Elements.text(el.by_class("swallow-reasoning-text")[0]) == DEMO_REASONING
    (answer,) = el.by_class("swallow-answer")
    assert el.inside(answer, "p") and Elements.text(answer).startswith("これは")
    stats = Elements.text(el.by_class("swallow-stats")[0])
    assert stats.split(" · ")[0] in ("stop", "length")
    assert "tokens/s" in stats and "first token" in stats and "(random weights: the output is noise)" in stats

    # `await s.display()` on an astream
    (shown,) = stream_displays(code[3])
    assert Elements.text(rendered(shown).by_class("swallow-reasoning-text")[0]) == DEMO_REASONING
    assert f"reasoning: {DEMO_REASONING}" in texts[3]

    # Chat: each turn shows one live output, and the history round-trips through a file
    for cell in code[4:6]:
        (shown,) = stream_displays(cell)
        assert rendered(shown).by_class("swallow-stats")
    assert "['system', 'user', 'assistant', 'user', 'assistant']" in texts[5]

    # reasoning efforts side by side: one output, three panels
    (shown,) = stream_displays(code[6])
    el = rendered(shown)
    titles = [Elements.text(t) for t in el.by_class("swallow-title")]
    assert titles == ["reasoning_effort='low'", "reasoning_effort='medium'", "reasoning_effort='high'"]
    assert len(el.by_class("swallow-panel")) == 3 and len(el.by_class("swallow-stats")) == 3
    assert all(f"{e:>6}: " in texts[6] for e in ("low", "medium", "high"))

    # a WebSocket stream shows itself the same way
    (shown,) = stream_displays(code[7])
    assert Elements.text(rendered(shown).by_class("swallow-reasoning-text")[0]) == DEMO_REASONING
    assert f"reasoning: {DEMO_REASONING}" in texts[7]
