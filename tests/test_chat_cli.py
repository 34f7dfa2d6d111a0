"""`bayling chat` in a pseudo-terminal against the real server: streaming Markdown, history,
q and /clear, /system, /params, Ctrl-C stopping an answer, and the ways out."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pexpect
import pytest

from tests.client_helpers import PROMPT, metric, plain, settled

pytestmark = pytest.mark.e2e
USAGE = re.compile(r"\((\d+) prompt \+ (\d+) answer tokens, (\w+)")


def terminal_lines(raw: str) -> list[str]:
    """What was drawn, cut at line ends, carriage returns and rich's cursor-up / erase-line codes."""
    return [plain(part).strip() for part in re.split(r"[\r\n]|\x1b\[\d*[AK]", raw)]


class Chat:
    """One `bayling chat` session in a pseudo-terminal (160 columns, so answers are not wrapped)."""

    def __init__(self, url: str, *args: str):
        # the terminal's own size, as for a user (pytest's environment may carry COLUMNS=80)
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        self.child = pexpect.spawn(sys.executable, ["-m", "bayling.cli", "chat", "--url", url, *args],
                                   encoding="utf-8", dimensions=(50, 160), timeout=90, env=env)
        self.child.expect(PROMPT)
        self.banner = plain(self.child.before)

    def say(self, line: str) -> str:
        """Send a line and return everything printed until the next prompt (raw, with terminal codes)."""
        self.child.sendline(line)
        self.child.expect(PROMPT)
        return self.child.before

    def ask(self, line: str) -> tuple[str, int, int, str]:
        """(answer shown, prompt tokens, answer tokens, finish reason) of one question."""
        segments = [s for s in terminal_lines(self.say(line)) if s]
        usage = [i for i, s in enumerate(segments) if USAGE.match(s)]
        assert usage, segments
        found = USAGE.match(segments[usage[-1]])
        # the last line rich drew before the usage line (answers asked for here fit on one line)
        answer = segments[usage[-1] - 1] if usage[-1] > 1 else ""
        return answer, int(found.group(1)), int(found.group(2)), found.group(3)

    def close(self):
        if self.child.isalive():
            self.child.terminate(force=True)


@pytest.fixture
def chat(default_server):
    sessions = []

    def start(*args: str, url: str | None = None) -> Chat:
        session = Chat(url or default_server.grpc, *args)
        sessions.append(session)
        return session

    yield start
    for session in sessions:
        session.close()


def test_answers_stream_as_markdown_and_the_history_is_kept_until_q_or_clear(chat):
    c = chat("--temperature", "0", "--max-tokens", "48")
    assert "SmolLM2-135M-Instruct" in c.banner and "llamacpp" in c.banner
    raw = c.say("Write two sentences about the sea.")
    # rich's Live redraws the growing answer in place: several frames, each extending the one before
    frames = [s for s in terminal_lines(raw) if s and not s.startswith(("Write two", "("))]
    assert len(frames) >= 3, frames
    longest = max(frames, key=len)
    assert len(frames[0]) < len(longest) and longest.startswith(frames[0]), frames

    assert "clear history..." in plain(c.say("/clear"))
    q1, p1, a1, _ = c.ask("Name the capital of France.")
    assert "Paris" in q1
    q2, p2, _, _ = c.ask("And of Germany?")
    assert p2 > p1 + a1, "the second prompt must carry the first question and its answer"
    assert "Berlin" in q2

    out = plain(c.say("q"))
    assert "clear history..." in out
    again, p1_again, _, _ = c.ask("Name the capital of France.")
    assert (again, p1_again) == (q1, p1)
    assert c.ask("And of Germany?")[1] == p2
    assert "clear history..." in plain(c.say("/clear"))
    assert c.ask("Name the capital of France.")[:2] == (q1, p1)


def test_system_message_can_be_set_shown_and_removed(chat):
    c = chat("--temperature", "0", "--max-tokens", "16")
    _, p_plain, _, _ = c.ask("Say hello.")
    assert "no system message" in plain(c.say("/system"))
    system = "You are a pirate. You always answer like a pirate, with many pirate words."
    assert "system message set" in plain(c.say(f"/system {system}"))
    assert system in plain(c.say("/system"))
    c.say("/clear")
    _, p_system, _, _ = c.ask("Say hello.")
    assert p_system != p_plain, "the system message must be part of the prompt"
    assert "system message removed" in plain(c.say("/system none"))
    c.say("/clear")
    assert c.ask("Say hello.")[1] == p_plain


def test_system_option_and_http_url(chat, default_server):
    c = chat("--system", "Answer with one word.", "--temperature", "0", "--max-tokens", "8",
             url=f"http://{default_server.http}")
    assert "Answer with one word." in plain(c.say("/system"))
    answer, _, tokens, reason = c.ask("Name the capital of France.")
    assert answer and 0 < tokens <= 8 and reason in ("stop", "length")


def test_params_are_shown_validated_and_applied(chat):
    c = chat("--temperature", "0", "--max-tokens", "24")
    out = plain(c.say("/params"))
    assert "max_tokens=24" in out and "temperature=0.0" in out
    out = plain(c.say("/params temperature=500"))
    assert "error" in out and "temperature" in out
    assert "temperature=0.0" in plain(c.say("/params"))   # unchanged after the error
    out = plain(c.say("/params max_tokens=3"))
    assert "max_tokens=3" in out
    _, _, tokens, reason = c.ask("Tell me a story about a dragon.")
    assert (tokens, reason) == (3, "length")


def test_ctrl_c_stops_the_answer_on_the_server_and_the_chat_goes_on(chat, default_server):
    c = chat("--temperature", "0")
    c.say("/params min_length=400 max_tokens=400")
    cancelled = lambda: metric(default_server.metrics, "bayling_requests_total", finish_reason="cancelled")  # noqa: E731
    generated = lambda: metric(default_server.metrics, "bayling_engine_generated_tokens_total")  # noqa: E731
    cancelled_before, generated_before = cancelled(), generated()
    c.child.sendline("Tell me a very long story about a dragon and a knight.")
    c.child.expect("knight.\r\n")                            # the echoed question
    c.child.expect(r"\w+ \w+ \w+ \w+ \w+ \w+")                 # the answer is streaming
    c.child.kill(signal.SIGINT)
    c.child.expect("stopped")
    c.child.expect(PROMPT)
    assert c.child.isalive()
    assert settled(generated) - generated_before < 300, "the engine kept generating after Ctrl-C"
    assert settled(cancelled) == cancelled_before + 1
    c.say("/params min_length=0 max_tokens=16")
    answer, _, tokens, _ = c.ask("Name the capital of France.")
    assert "Paris" in answer and tokens <= 16


def test_ctrl_c_at_the_prompt_does_not_leave(chat):
    c = chat()
    c.child.kill(signal.SIGINT)
    c.child.expect("empty line or Ctrl-D exits")
    c.child.expect(PROMPT)
    assert c.child.isalive()


@pytest.mark.parametrize("leave", ["empty line", "ctrl-d"])
def test_an_empty_line_or_ctrl_d_exits(chat, leave):
    c = chat()
    if leave == "empty line":
        c.child.sendline("")
    else:
        c.child.sendeof()
    c.child.expect("bye")
    c.child.expect(pexpect.EOF)
    c.child.close()
    assert c.child.exitstatus == 0


def test_piped_input_prints_plain_streamed_text(default_server):
    """Without a terminal the answer is plain text (no colour codes); the end of input exits."""
    out = subprocess.run([sys.executable, "-m", "bayling.cli", "chat", "--url", default_server.grpc,
                          "--temperature", "0", "--max-tokens", "16"],
                         input="Name the capital of France.\n", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout   # greedy wording varies with the CPU's arithmetic ("Paris." / "Paris, France.")
    assert "\x1b[" not in out.stdout and out.stdout.rstrip().endswith("bye")


def test_unreachable_server_is_one_line_error():
    out = subprocess.run([sys.executable, "-m", "bayling.cli", "chat", "--url", "127.0.0.1:1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.startswith("bayling chat: error: cannot reach the server at 127.0.0.1:1")
    assert "Traceback" not in out.stderr
