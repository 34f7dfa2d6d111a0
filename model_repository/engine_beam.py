"""Beam search on the CPU engine: CTranslate2's `beam_size` / `num_hypotheses`, one request per call.

CTranslate2 calls back per token only without beams, so a beam request is answered once, at the end,
with every beam (best first), as TensorRT-LLM's non-streamed beam search: `output_ids` [1, beam, n].
Per-token log probs, when asked, are CTranslate2's scores of each beam's tokens (`score_batch`);
`cum_log_probs` is their sum. A stop word ends a beam where it completes (found after the search).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bayling.params import NO_END_ID

if TYPE_CHECKING:
    from bayling.model_repository.engine_ct2 import Ct2Engine, _Active

MAX_BEAM_WIDTH = 8


def cut_at_stop_word(ids: list[int], stop_words: list[list[int]]) -> list[int]:
    for end in range(1, len(ids) + 1):
        if any(len(w) <= end and ids[end - len(w):end] == w for w in stop_words):
            return ids[:end]
    return ids


def run(engine: "Ct2Engine", active: "_Active") -> None:
    request, vocab = active.request, engine.vocabulary
    prompt = [vocab[t] for t in request.input_ids]
    options = dict(beam_size=request.beam_width, num_hypotheses=request.beam_width,
                   length_penalty=request.length_penalty, max_length=request.max_new_tokens,
                   include_prompt_in_result=False, repetition_penalty=request.repetition_penalty,
                   min_length=request.min_length)
    if request.end_id is not None:
        options["end_token"] = [] if request.end_id == NO_END_ID else [request.end_id]
    if request.bad_words:
        options["suppress_sequences"] = [[vocab[t] for t in w] for w in request.bad_words]
    try:
        result = engine.generator.generate_batch([prompt], **options)[0]
        beams = [cut_at_stop_word(list(ids)[:request.max_new_tokens], request.stop_words)
                 for ids in result.sequences_ids]
        if request.return_log_probs:
            scored = engine.generator.score_batch([prompt + [vocab[t] for t in ids] for ids in beams])
            log_probs = [list(s.log_probs[len(prompt) - 1:]) if ids else [] for s, ids in zip(scored, beams)]
            log_probs = [probs[-len(ids):] if ids else [] for probs, ids in zip(log_probs, beams)]
        else:
            log_probs = [[0.0] * len(ids) for ids in beams]
        active.beams = list(zip(beams, log_probs))
        active.generated, active.log_probs = list(beams[0]), list(log_probs[0])
        engine.generated_tokens += sum(len(ids) for ids in beams)
        engine._finish(active)
    except Exception as exc:
        engine._finish(active, error=exc)
