"""What every engine (llama.cpp, CTranslate2, the LLM API) is checked for in the same way, in-process."""

from __future__ import annotations

import threading
import time

from bayling.model_repository.engine_ct2 import EngineRequest
from tests.client_helpers import Collector


def greedy(prompt: list[int], request_id: str = "", **kw) -> EngineRequest:
    """A greedy request of at most 64 new tokens, ending at the scripted tokenizer's EOS (2) unless told."""
    kw.setdefault("end_id", 2)
    return EngineRequest(request_id=request_id, input_ids=prompt, max_new_tokens=kw.pop("max_new_tokens", 64),
                         top_k=1, **kw)


def stream_behind_a_slow_first_send(engine, prompt: list[int], pause_s: float = 0.5) -> Collector:
    """Stream `prompt` while its first send takes `pause_s`, so that tokens pile up behind it."""
    out, first = Collector(), threading.Event()

    def slow(emission):
        if not out.emissions:
            first.wait(10)
        out(emission)

    engine.submit(greedy(prompt, streaming=True), slow)
    time.sleep(pause_s)
    first.set()
    return out.wait()


def check_concurrent_requests_stay_separate(engine, prompt: list[int], script: list[int]) -> None:
    """Six requests of different lengths at once: they share engine steps, and each gets its own answer."""
    outs = [Collector() for _ in range(6)]
    before = len(engine.batch_sizes)
    for i, out in enumerate(outs):
        engine.submit(greedy(prompt, max_new_tokens=2 + i), out)
    for i, out in enumerate(outs):
        assert out.wait().tokens == script[:2 + i]
    assert max(list(engine.batch_sizes)[before:]) > 1
