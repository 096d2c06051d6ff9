"""The chat UI in headless Chromium: reasoning and answer as separate messages, Stop really
stops generation, and a screenshot kept in test-artifacts/ (install: scripts/install-browser.sh)."""

from __future__ import annotations

import os
import time

import pytest

from server_helpers import ARTIFACTS, ScriptedBackend, serve

pytestmark = pytest.mark.slow  # a headless Chromium per test

CHROMIUM = "/usr/bin/chromium"

REASONING = ("The user wants a casual one-day Tokyo itinerary, written in Japanese. "
             "Morning in Asakusa, lunch nearby, afternoon in Harajuku, evening view from Shibuya.")
ANSWER = ("## 東京カジュアル日帰りプラン\n\n"
          "- **9:00** 浅草寺と仲見世通りを散歩\n"
          "- **12:00** 浅草で天丼ランチ\n"
          "- **14:00** 原宿・竹下通りでショッピング\n"
          "- **18:00** 渋谷スカイから夜景を楽しむ\n")


def pieces(text: str, n: int = 4) -> list[str]:
    return [text[i:i + n] for i in range(0, len(text), n)]


def script(messages):
    if "long" in messages[-1]["content"]:
        return [("analysis", f"step {i}. ") for i in range(60)] + [("final", f"w{i} ") for i in range(2000)]
    return [("analysis", p) for p in pieces(REASONING)] + [("final", p) for p in pieces(ANSWER)]


@pytest.fixture(scope="module")
def browser_page():
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium not installed: run scripts/install-browser.sh")
    from playwright.sync_api import sync_playwright

    from swallow_stream.server import Settings, build_app

    b = ScriptedBackend(name="tokyotech-llm/GPT-OSS-Swallow-120B-RL-v0.1-MXFP4", script=script, delay=0.03)
    with serve(build_app(b, Settings())) as srv, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1100})
            page.set_default_timeout(30_000)
            page.goto(srv.url)
            page.wait_for_selector("#prompt textarea")
            page.browser_handle = browser
            yield page, b
        finally:
            browser.close()


def bot_messages(page) -> list:
    return page.locator("#chatbot [data-testid='bot']").all()


def test_reasoning_and_answer_render_as_separate_messages(browser_page):
    page, backend = browser_page
    assert "GPT-OSS-Swallow-120B-RL-v0.1-MXFP4" in page.inner_text("#model-info")
    page.fill("#prompt textarea", "Create a casual one-day Tokyo itinerary in Japanese.")
    page.press("#prompt textarea", "Enter")
    page.wait_for_selector("#chatbot :text('渋谷スカイ')")
    page.wait_for_selector("#stats :text('tokens/s')")
    bots = bot_messages(page)
    assert len(bots) == 2
    thought, answer = bots
    assert thought.locator(".thought-group").count() == 1 and "Reasoning" in thought.inner_text()
    assert answer.locator(".thought-group").count() == 0
    assert "浅草寺" in answer.inner_text() and "Asakusa" not in answer.inner_text()
    # done: no spinner, a duration; clicking the title opens the reasoning
    assert thought.locator(".loading-spinner").count() == 0
    assert thought.locator(".duration").count() == 1
    thought.locator(".title").click()
    page.wait_for_selector("#chatbot :text('Morning in Asakusa')")
    # let the opening transition finish before the screenshot
    page.wait_for_function("() => { const e = document.querySelector('#chatbot .thought-group .content');"
                           " return e && e.getBoundingClientRect().height > 0 && document.getAnimations().length === 0; }")
    assert "Morning in Asakusa" in thought.inner_text()
    assert page.locator("#chatbot h2").count() == 1  # the answer's markdown is rendered
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "ui-reasoning-and-answer.png"), full_page=True)


def test_stop_button_stops_generation(browser_page):
    page, backend = browser_page
    backend.cancel_seen.clear()
    n_cancelled = len(backend.cancelled)
    page.fill("#prompt textarea", "Tell me a long story")
    page.press("#prompt textarea", "Enter")
    # while the reasoning streams it is pending (spinner), before any answer exists
    page.wait_for_selector("#chatbot .thought-group .loading-spinner")
    page.wait_for_selector("#chatbot :text('w5 ')")
    page.click("#stop")
    assert backend.cancel_seen.wait(10), "the backend never saw the cancel"
    assert len(backend.cancelled) == n_cancelled + 1
    src = backend.cancelled[-1]
    sent = src.sent
    assert sent < 500  # 2060 scripted tokens; generation stopped early
    time.sleep(0.5)
    assert src.sent == sent  # and nothing more was produced after the stop
    shown = bot_messages(page)[-1].inner_text()
    time.sleep(0.3)
    assert bot_messages(page)[-1].inner_text() == shown
    assert "w5" in shown and "w1999" not in shown
    page.screenshot(path=os.path.join(ARTIFACTS, "ui-after-stop.png"), full_page=True)


def test_tiny_model_page_shows_the_noise_banner(browser_page, tiny_server):
    page, _ = browser_page
    tab = page.browser_handle.new_page(viewport={"width": 1200, "height": 1100})
    tab.set_default_timeout(30_000)
    try:
        tab.goto(tiny_server.url)
        banner = tab.wait_for_selector("#tiny-banner")
        assert "random noise" in banner.inner_text()
        assert "tiny" in tab.inner_text("#model-info")
        tab.fill("#prompt textarea", "こんにちは")
        tab.press("#prompt textarea", "Enter")
        tab.wait_for_selector("#stats :text('tokens/s')")
        # the tiny demo model babbles a reasoning message, then an answer, then stops
        tab.wait_for_selector("#stats :text-matches('stop|length')", timeout=60_000)
        assert "Reasoning" in tab.inner_text("#chatbot")
        tab.screenshot(path=os.path.join(ARTIFACTS, "ui-tiny-model.png"), full_page=True)
    finally:
        tab.close()


def test_login_with_the_api_key_then_chat(browser_page):
    """With --api-key the page is a login; the key as the password opens the chat, and the chat
    streams (the session's cookie passes every /gradio_api call)."""
    from swallow_stream.server import Settings, build_app

    page, _ = browser_page
    b = ScriptedBackend(name="keyed-model", script=script, delay=0.01)
    with serve(build_app(b, Settings(api_key="browser-key"))) as srv:
        tab = page.browser_handle.new_page(viewport={"width": 1200, "height": 1100})
        tab.set_default_timeout(30_000)
        try:
            tab.goto(srv.url)
            tab.wait_for_selector("input[type='password']")
            assert tab.locator("#prompt textarea").count() == 0
            tab.fill("input[type='text']", "me")
            tab.fill("input[type='password']", "wrong")
            tab.click("button:has-text('Login')")
            tab.wait_for_selector(":text('Incorrect')")
            tab.fill("input[type='text']", "me")  # Gradio's form clears both fields after a failure
            tab.fill("input[type='password']", "browser-key")
            tab.click("button:has-text('Login')")
            tab.wait_for_selector("#prompt textarea")
            assert "keyed-model" in tab.inner_text("#model-info")
            tab.fill("#prompt textarea", "Create a casual one-day Tokyo itinerary in Japanese.")
            tab.press("#prompt textarea", "Enter")
            tab.wait_for_selector("#chatbot :text('渋谷スカイ')")
            tab.screenshot(path=os.path.join(ARTIFACTS, "ui-after-login.png"), full_page=True)
        finally:
            tab.close()
