"""Helpers shared by the notebook display and Chat tests."""

from html.parser import HTMLParser

import pytest

from swallow_stream.harmony import get_tokenizer

from engine_helpers import script_tokens

REASONING = "ユーザーは<b>太字</b>の旅程を求めている。"
ANSWER = "**浅草**から始めましょう。<script>alert(1)</script>"


def harmony_completion(reasoning=REASONING, answer=ANSWER):
    tok = get_tokenizer()
    return (
        [200005] + tok.encode("analysis") + [200008] + tok.encode(reasoning)
        + [200007, 200006] + tok.encode("assistant") + [200005] + tok.encode("final") + [200008]
        + tok.encode(answer) + [200002]
    )


@pytest.fixture
def scripted_engine(make_engine, tiny_path):
    """An engine on the tiny checkpoint whose every reply is harmony_completion()."""
    engine = make_engine(tiny_path)
    script_tokens(engine, harmony_completion())
    return engine


@pytest.fixture
def ipython_outputs():
    """An IPython shell whose display publisher records every publish; -> (shell, outputs)."""
    from IPython.core.displaypub import CapturingDisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    assert not InteractiveShell.initialized()
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    shell.display_pub = CapturingDisplayPublisher()
    try:
        yield shell, shell.display_pub.outputs
    finally:
        InteractiveShell.clear_instance()


class Elements(HTMLParser):
    """The elements of an HTML fragment: (tag, attrs, inner text, inner html) per element."""

    VOID = {"br", "hr", "img", "input", "meta", "link"}

    def __init__(self, source: str):
        super().__init__(convert_charrefs=True)
        self.source = source
        self.found: list[dict] = []
        self._open: list[dict] = []
        self.feed(source)

    def handle_starttag(self, tag, attrs):
        el = {"tag": tag, "attrs": dict(attrs), "text": [], "parents": list(self._open)}
        self.found.append(el)
        if tag not in self.VOID:
            self._open.append(el)

    def handle_endtag(self, tag):
        while self._open:
            el = self._open.pop()
            if el["tag"] == tag:
                break

    def handle_data(self, data):
        for el in self._open:
            el["text"].append(data)

    def by_class(self, cls: str) -> list[dict]:
        return [e for e in self.found if cls in e["attrs"].get("class", "").split()]

    def inside(self, parent: dict, tag: str) -> list[dict]:
        return [e for e in self.found if e["tag"] == tag and any(p is parent for p in e["parents"])]

    @staticmethod
    def text(el) -> str:
        return "".join(el["text"])
