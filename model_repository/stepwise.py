"""Step-wise decoding on the CPU engine, for what CTranslate2's `generate_batch` cannot do.

CTranslate2 4.8 has no Python logits processor: `generate_batch` offers repetition_penalty,
suppress_sequences and a per-step log prob, but no additive bias, no OpenAI presence/frequency
penalties and no per-step logits. A request that asks for any of these (`embedding_bias`,
`presence_penalty`, `frequency_penalty`, `return_generation_logits`) is decoded here instead,
one token per `Generator.forward_batch` call: the model's logits for the sequence so far, then
the bias and penalties (as OpenAI defines them), then greedy choice or sampling (temperature,
top_k, top_p) with its own seeded random generator. There is no KV cache between steps, so each
step re-reads the whole sequence: fine for the short answers these options are used for, slower
for long ones (the cost is paid only by requests that ask for these options).

Order of the logit changes (OpenAI's and vLLM's): logits + bias - frequency_penalty * count
- presence_penalty * (count > 0), counts over the generated tokens; then CTranslate2's
repetition penalty over prompt and answer; then min_length and bad words. Reported log probs
(`output_log_probs`) and `generation_logits` are the model's own, before those changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from bayling.model_repository.engine_ct2 import Ct2Engine, EngineRequest, _Active


def log_softmax_at(logits: np.ndarray, token: int) -> float:
    top = float(logits.max())
    return float(logits[token]) - top - float(np.log(np.exp(logits - top).sum()))


def adjusted(raw: np.ndarray, request: "EngineRequest", context: list[int], counts: np.ndarray,
             n_generated: int) -> np.ndarray:
    """The logits the next token is chosen from."""
    x = raw.astype(np.float32, copy=True)
    if request.embedding_bias is not None:
        x += request.embedding_bias
    if request.frequency_penalty or request.presence_penalty:
        x -= request.frequency_penalty * counts + request.presence_penalty * (counts > 0)
    if request.repetition_penalty != 1.0:
        seen = np.unique(np.asarray(context, dtype=np.int64))
        values = x[seen]
        x[seen] = np.where(values > 0, values / request.repetition_penalty, values * request.repetition_penalty)
    if n_generated < request.min_length and request.end_id is not None and request.end_id >= 0:
        x[request.end_id] = -np.inf
    for word in request.bad_words:
        if len(word) == 1 or context[-(len(word) - 1):] == word[:-1]:
            x[word[-1]] = -np.inf
    return x


def choose(x: np.ndarray, request: "EngineRequest", rng: np.random.Generator) -> int:
    if request.greedy:
        return int(np.argmax(x))
    x = x.astype(np.float64) / max(request.temperature, 1e-6)
    if 0 < request.top_k < len(x):
        cut = np.partition(x, -request.top_k)[-request.top_k]
        x = np.where(x >= cut, x, -np.inf)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if 0 < request.top_p < 1:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        keep = order[:int(np.searchsorted(cumulative, request.top_p)) + 1]
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return int(rng.choice(len(probs), p=probs))


def run(engine: "Ct2Engine", active: "_Active") -> None:
    """Decode one request to its end (or cancellation), one token per forward pass."""
    from bayling.model_repository.engine_ct2 import ends_with_stop_word   # (engine_ct2 imports this module)

    request = active.request
    vocab = len(engine.vocabulary)
    context = list(request.input_ids) + active.generated
    counts = np.zeros(vocab, dtype=np.float32)
    for t in active.generated:
        counts[t] += 1
    rng = np.random.default_rng(request.random_seed)
    while not active.done:
        if active.cancelled:
            engine._finish(active)
            return
        raw = np.asarray(engine.generator.forward_batch([context]))[0, -1, :vocab]
        token = choose(adjusted(raw, request, context, counts, len(active.generated)), request, rng)
        if request.end_id is not None and token == request.end_id:
            engine._finish(active)
            return
        context.append(token)
        counts[token] += 1
        active.generated.append(token)
        engine.generated_tokens += 1
        active.log_probs.append(log_softmax_at(raw, token))
        if request.return_generation_logits:
            active.logits.append(raw.copy())
        n = len(active.generated)
        if n >= request.max_new_tokens or active.cancelled or ends_with_stop_word(active.generated, request.stop_words):
            engine._finish(active)
            return
        if request.streaming:
            active.box.length = n
            engine.relay.wake(active.box)
