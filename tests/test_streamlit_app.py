"""The Streamlit demo page against the real server: Streamlit's AppTest for the page logic,
and once in a real headless Chromium (Debian's, driven by Playwright) through `bayling demo-ui`."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from bayling.model_repository.server import free_port
from tests.client_helpers import ROOT, bayling_process, http_ok, metric, stop_process, wait_until
from tests.conftest import SCRIPT_SHOWN

pytestmark = pytest.mark.e2e
APP = ROOT / "client" / "streamlit_app.py"
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture
def page(monkeypatch):
    """An AppTest of the page for a server URL."""
    from streamlit.testing.v1 import AppTest

    def open_page(url: str) -> "AppTest":
        monkeypatch.setenv("BAYLING_URL", url)
        at = AppTest.from_file(str(APP), default_timeout=120)
        at.run()
        assert not at.exception, at.exception
        return at

    return open_page


def chat_texts(at) -> list[tuple[str, str]]:
    return [(m.name, " ".join(md.value for md in m.markdown)) for m in at.chat_message]


def test_status_shows_model_engine_and_ready(page, default_server):
    at = page(default_server.grpc)
    assert [s.value for s in at.sidebar.success] == ["ready"]
    status = " ".join(m.value for m in at.sidebar.markdown)
    assert "SmolLM2-135M-Instruct" in status and "llamacpp" in status and "2048 tokens" in status
    labels = [w.label for w in at.sidebar.slider] + [w.label for w in at.sidebar.number_input]
    assert labels == ["Temperature", "Top p", "Max tokens"]
    assert [t.label for t in at.tabs] == ["Chat", "Translate"]


def test_chat_streams_the_answer_keeps_the_history_and_clears_it(page, scripted_server):
    at = page(scripted_server.grpc)
    at.sidebar.slider[0].set_value(0.0)                           # greedy: the scripted answer
    at.chat_input[0].set_value("你好").run()
    assert not at.exception, at.exception
    assert chat_texts(at) == [("user", "你好"), ("assistant", SCRIPT_SHOWN)]
    at.chat_input[0].set_value("你是谁？").run()
    assert chat_texts(at) == [("user", "你好"), ("assistant", SCRIPT_SHOWN),
                              ("user", "你是谁？"), ("assistant", SCRIPT_SHOWN)]
    at.sidebar.button[0].click().run()                             # Clear chat
    assert at.sidebar.button[0].label == "Clear chat"
    assert chat_texts(at) == []


def test_sidebar_parameters_and_system_text_reach_the_server(page, default_server):
    at = page(default_server.grpc)
    at.sidebar.slider[0].set_value(0.0)
    at.sidebar.number_input[0].set_value(3)
    at.chat_input[0].set_value("Tell me a long story about a dragon.").run()
    (_, _), (_, answer) = chat_texts(at)
    assert answer and len(answer.split()) <= 3                      # max tokens 3
    def answered():   # a 3-token answer ends by length, or by the model's end token on some CPUs
        return sum(metric(default_server.metrics, "bayling_requests_total", finish_reason=r) for r in ("length", "stop"))

    before = answered()
    at.sidebar.text_area[0].input("Answer in French.").run()
    at.chat_input[0].set_value("Hello!").run()
    assert len(chat_texts(at)) == 4
    assert answered() == before + 1


def test_server_errors_are_shown_in_the_page(page, default_server):
    at = page(default_server.grpc)
    at.chat_input[0].set_value("word " * 9000).run()               # longer than the context
    assert not at.exception
    errors = [e.value for e in at.error]
    assert any(e.startswith("The server could not answer: messages: the prompt needs") for e in errors), errors
    assert [m.name for m in at.chat_message] == ["user", "assistant"]   # nothing added to the history
    at.chat_input[0].set_value("Hi").run()
    assert [m.name for m in at.chat_message] == ["user", "assistant"]


def test_unreachable_server_is_shown_not_a_traceback(page):
    at = page("127.0.0.1:1")
    assert not at.exception
    assert any("not ready" in e.value for e in at.sidebar.error)
    assert any("No server to talk to" in w.value for w in at.warning)
    assert at.chat_input[0].disabled


def test_translation_tab(page, default_server):
    at = page(default_server.grpc)
    tab = at.tabs[1]
    tab.text_area[0].input("The train number 4711 leaves at 8 o'clock.\n\nThe train number 2093 leaves at 6 o'clock.")
    tab.selectbox[0].set_value("de")
    tab.radio[0].set_value("en")
    at.sidebar.number_input[0].set_value(24)
    at.run()
    at.tabs[1].button[0].click().run()
    shown = [m.value for m in at.tabs[1].markdown]
    assert len(shown) == 2 and shown[0].startswith("**1.** The train number 4711") and "→" in shown[0]
    assert shown[1].startswith("**2.** The train number 2093")
    assert not at.tabs[1].error


def test_in_a_real_browser_a_typed_message_gets_a_streamed_answer(default_server, tmp_path):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "Debian's chromium is missing: run scripts/install-test-tools.sh"

    port = free_port()
    ui = bayling_process("demo-ui", "--url", default_server.grpc, "--port", str(port),
                         env={"HOME": str(tmp_path)})                  # Streamlit's config and credentials
    try:
        wait_until(lambda: ui.poll() is not None or http_ok(f"http://127.0.0.1:{port}/_stcore/health"), 60,
                   "the Streamlit server")
        assert ui.poll() is None, stop_process(ui)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            try:
                tab = browser.new_page(viewport={"width": 1280, "height": 900})
                tab.goto(f"http://127.0.0.1:{port}/", timeout=60_000)
                tab.get_by_text("ready", exact=True).wait_for(timeout=60_000)
                tokens = tab.get_by_label("Max tokens")
                tokens.fill("64")
                tokens.press("Enter")
                tab.wait_for_timeout(1000)                          # the page reruns with the new value
                box = tab.get_by_test_id("stChatInputTextArea")
                box.fill("Write a short poem about the sea.")
                box.press("Enter")
                answer = tab.get_by_test_id("stChatMessage").nth(1)
                answer.wait_for(timeout=60_000)
                seen = []                                           # the answer as it grows
                changed = time.monotonic()
                deadline = changed + 120
                while time.monotonic() < deadline and time.monotonic() - changed < 3:
                    text = answer.inner_text().strip()
                    if text and (not seen or text != seen[-1]):
                        seen.append(text)
                        changed = time.monotonic()
                    time.sleep(0.05)
                shot = tmp_path / "streamlit-demo.png"
                tab.screenshot(path=str(shot), full_page=True)
            finally:
                browser.close()
        assert len(seen) >= 3, f"no streaming seen: {seen}"
        assert all(later.startswith(earlier[:10]) for earlier, later in zip(seen, seen[1:]))
        assert len(seen[0]) < len(seen[-1])
        assert shot.stat().st_size > 10_000
        if os.environ.get("BAYLING_SAVE_SCREENSHOT"):               # refresh docs/img/streamlit-demo.png
            shutil.copy(shot, os.environ["BAYLING_SAVE_SCREENSHOT"])
    finally:
        stop_process(ui)
