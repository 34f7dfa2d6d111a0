"""The output path of one request: token ids in, the exact text a user reads out.

    ids -> IncrementalDetokenizer -> placeholders -> stop strings -> text

Each stage is streaming-safe: it holds back text that could still turn into a
match (the start of ``[NAME]``, of a stop string) until the next piece decides it. The streamed pieces joined are
therefore always equal to running the same stages over the full decode, which
is what BayLing's original tools show (they re-decode the whole output at each
step: ``tokenizer.decode(ids, skip_special_tokens=True)``, then replace the
placeholders, then cut at the stop string).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from bayling.detokenizer import ByteRuns, Decode, IncrementalDetokenizer

# BayLing's released weights are anonymised: the model writes these, and its post-processing
# (ictnlp/BayLing bayling/inference.py, MODEL_CARD and post_process) replaces them.
MODEL_CARD: dict[str, str] = {
    "[NAME]": "BayLing",
    "[INSTITUTE]": "NLP group of Institute of Computing Technology, Chinese Academy of Sciences (ICT/CAS)",
    "[CREATE_TIME]": "2023",
    "[名字]": "百聆",
    "[机构]": "中国科学院计算技术研究所自然语言处理研究组",
    "[开发时间]": "2023年",
}
PLACEHOLDERS: dict[str, str] = {**MODEL_CARD, "\\n": "\n"}  # then a literal backslash-n becomes a newline

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"


def _longest_partial(text: str, keys: Iterable[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `keys`."""
    best = 0
    for key in keys:
        for n in range(min(len(key) - 1, len(text)), best, -1):
            if text.endswith(key[:n]):
                best = n
                break
    return best


class StreamingReplacer:
    """``str.replace(key, value)`` on a stream: joined output == the replacement of the joined input."""

    def __init__(self, key: str, value: str):
        self.key, self.value = key, value
        self._held = ""

    def feed(self, text: str) -> str:
        buffer, out, i = self._held + text, [], 0
        while (j := buffer.find(self.key, i)) >= 0:  # leftmost, non-overlapping: as str.replace
            out += [buffer[i:j], self.value]
            i = j + len(self.key)
        rest = buffer[i:]
        keep = _longest_partial(rest, (self.key,))  # could still become the key
        self._held = rest[len(rest) - keep:] if keep else ""
        out.append(rest[:len(rest) - keep])
        return "".join(out)

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out


class ReplaceChain:
    """Several replacements in order, like chained ``str.replace`` calls (they can interact)."""

    def __init__(self, table: dict[str, str]):
        self.table = table
        self._stages = [StreamingReplacer(k, v) for k, v in table.items()]

    def replace_all(self, text: str) -> str:
        for key, value in self.table.items():
            text = text.replace(key, value)
        return text

    def feed(self, text: str) -> str:
        for stage in self._stages:
            text = stage.feed(text)
        return text

    def flush(self) -> str:
        text = ""
        for stage in self._stages:
            text = stage.feed(text) + stage.flush()
        return text


class StopStringFinder:
    """Cuts the stream at the first stop string; never shows any part of one."""

    def __init__(self, stop_strings: Sequence[str]):
        self._stops = [s for s in stop_strings if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        buffer = self._held + text
        hits = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return buffer[:min(hits)]
        keep = _longest_partial(buffer, self._stops)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep]

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out


class TextStream:
    """One request's output: feed engine tokens (one or many at a time), read new text, learn why it
    finished. The text, the finish reason and `completion_tokens` do not depend on how the ids were
    split into calls: a stop string found inside a many-token call counts the tokens up to the one
    that completed it, as one-token calls would."""

    def __init__(self, decode: Decode, *, byte_runs: ByteRuns = ByteRuns(), stop_token_ids: Iterable[int] = (),
                 stop_strings: Sequence[str] = (), placeholders: bool = False):
        self._config = dict(decode=decode, byte_runs=byte_runs, stop_token_ids=stop_token_ids,
                            stop_strings=stop_strings, placeholders=placeholders)
        self._detok = IncrementalDetokenizer(decode, byte_runs)
        self._placeholders = ReplaceChain(PLACEHOLDERS) if placeholders else None
        self._stops = StopStringFinder(stop_strings)
        self._stop_ids = frozenset(int(t) for t in stop_token_ids)
        self._ids: list[int] | None = [] if self._stops._stops else None   # kept only to recount a stop string
        self._grouped = False     # has a call brought more than one id?
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add_tokens(self, token_ids: Iterable[int]) -> str:
        """New visible text for these ids; sets `finish_reason` on a stop token or stop string."""
        if self.finished:
            return ""
        ids = []
        for t in token_ids:
            if int(t) in self._stop_ids:
                self.finish_reason = FINISH_STOP
                break
            ids.append(int(t))
        self.completion_tokens += len(ids)
        if self._ids is not None:
            self._ids += ids
            self._grouped = self._grouped or len(ids) > 1
        text = self._detok.add(ids)
        if self.finished:
            text += self._detok.flush()
        out = self._through_stages(text, flush=self.finished)
        if self._stops.stopped:
            self.finish_reason = FINISH_STOP
            self._count_to_stop_string()
        return out

    def _count_to_stop_string(self) -> None:
        """Once per request, on a stop string found after many-id calls: replay the ids one at a time,
        so that the count is the one-id-per-call count (the stop string can be decided an id or a call
        late, e.g. when it ends where a byte-fallback run starts)."""
        if not self._grouped:
            return
        replay = TextStream(**self._config)
        for t in self._ids:
            replay.add_tokens((t,))
            if replay.finished:
                break
        self.completion_tokens = replay.completion_tokens

    def finish(self, reason: str) -> str:
        """The engine is done (or the request was cancelled): flush what is held back.
        A stop string that only the flushed text completes still makes the reason `stop`."""
        if self.finish_reason is not None:
            return ""
        text = self._through_stages(self._detok.flush(), flush=True)
        self.finish_reason = FINISH_STOP if self._stops.stopped and reason != FINISH_CANCELLED else reason
        if self._stops.stopped:
            self._count_to_stop_string()
        return text

    def _through_stages(self, text: str, flush: bool) -> str:
        if self._placeholders:
            text = self._placeholders.feed(text) + (self._placeholders.flush() if flush else "")
        text = self._stops.feed(text)
        if flush and not self._stops.stopped:
            text += self._stops.flush()
        return text
