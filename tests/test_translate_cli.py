"""`bayling translate` against the real server: order, resuming after a kill, a failing line reported."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from bayling.client.translate_cli import translate_file
from tests.client_helpers import bayling_process, metric, settled, stop_process, wait_until

pytestmark = pytest.mark.e2e
# the small CPU model keeps the numbers when it translates these: each output line shows its input line
NUMBERED = [f"The train number {n} leaves at {n % 12 + 1} o'clock."
            for n in (4711, 2093, 8765, 3141, 5926, 1618, 2718, 6022, 1729, 9806, 3301, 4242)]


def assert_in_order(sources: list[str], outputs: list[str]) -> None:
    """No output line shows another line's number, and most show their own (the small model,
    batched with other requests, may drop one)."""
    numbers = [re.search(r"\d{4}", s).group() if s else None for s in sources]
    own = 0
    for number, dst in zip(numbers, outputs):
        others = [n for n in numbers if n and n != number and n in dst]
        assert not others, f"{dst!r} translates the line of {others}, not the line of {number}"
        own += bool(number and number in dst)
    assert own >= 0.6 * sum(1 for n in numbers if n), list(zip(numbers, outputs))


def translate(url: str, source, output, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bayling.cli", "translate", "--url", url, "--input", str(source),
                           "--output", str(output), "--instruction-lang", "en", "--target-lang", "de",
                           "--max-tokens", "24", *extra], capture_output=True, text=True, timeout=timeout)


def requests_answered(server) -> float:
    """Requests the server finished (not cancelled ones), once in-flight ones are done."""
    return settled(lambda: sum(metric(server.metrics, "bayling_requests_total", finish_reason=reason)
                               for reason in ("stop", "length")), pause=1.0)


def test_lines_come_out_in_input_order_with_empty_lines_kept(default_server, tmp_path):
    source, output = tmp_path / "in.en", tmp_path / "out.de"
    lines = NUMBERED[:3] + [""] + NUMBERED[3:6]
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    before = requests_answered(default_server)
    done = translate(default_server.grpc, source, output, "--concurrency", "4")
    assert done.returncode == 0, done.stderr
    out = output.read_text(encoding="utf-8").split("\n")
    assert out[-1] == "" and len(out) - 1 == len(lines)
    assert out[3] == ""
    assert_in_order(lines, out[:-1])
    assert requests_answered(default_server) - before == 6            # the empty line is not sent
    assert "7 lines: 6 to translate, 0 already translated" in done.stderr
    assert not (tmp_path / "out.de.failures.jsonl").exists()


def test_a_killed_run_resumes_and_skips_the_lines_already_translated(default_server, tmp_path):
    source, output = tmp_path / "in.en", tmp_path / "out.de"
    lines = NUMBERED
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    journal = tmp_path / "out.de.journal.jsonl"
    run = bayling_process("translate", "--url", default_server.grpc, "--input", str(source), "--output", str(output),
                          "--instruction-lang", "en", "--target-lang", "de", "--max-tokens", "24",
                          "--concurrency", "1")
    try:
        wait_until(lambda: journal.exists() and journal.read_text().count("\n") >= 3, 120, "3 translated lines")
        run.send_signal(signal.SIGKILL)
        run.wait(30)
    finally:
        stop_process(run)
    assert not output.exists(), "the output is written (atomically) only at the end"
    journaled = [json.loads(line) for line in journal.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(journaled) >= 3

    before = requests_answered(default_server)
    done = translate(default_server.grpc, source, output, "--concurrency", "1")
    assert done.returncode == 0, done.stderr
    skipped = len(journaled)
    assert f"12 lines: {12 - skipped} to translate, {skipped} already translated (skipped)" in done.stderr
    assert requests_answered(default_server) - before == 12 - skipped
    out = output.read_text(encoding="utf-8").splitlines()
    assert len(out) == 12 and all(out)
    for entry in journaled:
        assert out[entry["line"] - 1] == entry["text"]
    assert_in_order(lines, out)

    again = translate(default_server.grpc, source, output)
    assert "12 lines: 0 to translate, 12 already translated" in again.stderr
    assert output.read_text(encoding="utf-8").splitlines() == out


def test_a_failing_line_is_reported_not_lost_and_retried_next_time(default_server, tmp_path):
    source, output = tmp_path / "in.en", tmp_path / "out.de"
    too_long = "word " * 9000                                   # more tokens than the context holds
    source.write_text(f"{NUMBERED[0]}\n{too_long}\n{NUMBERED[1]}\n", encoding="utf-8")
    done = translate(default_server.grpc, source, output)
    assert done.returncode == 1
    assert re.search(r"line 2 failed: messages: the prompt needs \d+ tokens", done.stderr), done.stderr
    assert "1 line(s) failed" in done.stderr and "run the same command again" in done.stderr
    out = output.read_text(encoding="utf-8").split("\n")
    assert len(out) == 4 and out[1] == "" and "4711" in out[0] and out[2] and "4711" not in out[2]
    failures = [json.loads(line) for line in (tmp_path / "out.de.failures.jsonl").read_text().splitlines()]
    assert len(failures) == 1
    assert failures[0]["line"] == 2 and failures[0]["source"] == too_long.rstrip("\n")
    assert failures[0]["error"].startswith("messages: ")

    again = translate(default_server.grpc, source, output)
    assert again.returncode == 1
    assert "3 lines: 1 to translate, 2 already translated (skipped)" in again.stderr


def test_http_protocol_and_unreachable_server(default_server, tmp_path):
    source, output = tmp_path / "in.en", tmp_path / "out.de"
    source.write_text(NUMBERED[0] + "\n", encoding="utf-8")
    done = translate(f"http://{default_server.http}", source, output)
    assert done.returncode == 0, done.stderr
    assert "4711" in output.read_text(encoding="utf-8")
    down = translate("127.0.0.1:1", source, tmp_path / "other.de")
    assert down.returncode == 1
    assert down.stderr.strip() == "bayling translate: error: the server at 127.0.0.1:1 is not ready"


class RecordingClient:
    """Stands in for BayLingClient to see the prompts sent (the real client is tested above)."""

    def __init__(self):
        self.prompts = []

    def chat(self, messages, **params):
        from bayling.client import ChatResult

        self.prompts.append(messages[-1]["content"])
        return ChatResult(" translated\n line ", "stop", 1, 1)


@pytest.mark.parametrize("instruction_lang, target, expected", [
    ("zh", "en", "提供这句话的英文翻译：你好，世界。"),
    ("en", "zh", "Provide the Chinese translation for this sentence: 你好，世界。"),
    ("en", "Klingon", "Provide the Klingon translation for this sentence: 你好，世界。"),
])
def test_the_prompts_are_those_of_the_original_script(tmp_path, instruction_lang, target, expected):
    source, output = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("你好，世界。\n", encoding="utf-8")
    client = RecordingClient()
    assert translate_file(client, source, output, target, instruction_lang, log=open(os.devnull, "w")) == []
    assert client.prompts == [expected]
    assert output.read_text(encoding="utf-8") == "translated line\n"   # one line per input line


def test_interrupted_journal_line_is_ignored(tmp_path):
    """A run killed while writing its journal leaves a torn last line: the next run redoes that line."""
    source, output = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("a\nb\n", encoding="utf-8")
    client = RecordingClient()
    translate_file(client, source, output, "de", log=open(os.devnull, "w"))
    journal = tmp_path / "out.txt.journal.jsonl"
    text = journal.read_text(encoding="utf-8")
    journal.write_text(text[: len(text) - 10], encoding="utf-8")        # cut into the second entry
    client = RecordingClient()
    translate_file(client, source, output, "de", log=open(os.devnull, "w"))
    assert len(client.prompts) == 1
    assert output.read_text(encoding="utf-8") == "translated line\ntranslated line\n"
