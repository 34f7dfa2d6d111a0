"""The CPU engine behind the `tensorrt_llm` model: CTranslate2 INT8 generation with batching.

It speaks TensorRT-LLM's contract (see `bayling.contract.ENGINE_INPUTS`): the Triton
adapter turns each request into an `EngineRequest` and each `Emission` back into
`output_ids` / `sequence_length`. Concurrent requests that share sampling settings run as
one CTranslate2 batch; each request stops on its own (its length, end id, stop words,
cancellation) through the per-token callback, while the rest of its batch goes on.

CTranslate2 batches are static (a batch runs until its last member ends). So that a request
arriving while a batch runs does not wait for the whole batch, a compatible newcomer joins
it: the running batch stops at its next step and restarts with the newcomer, each running
request carrying on from its prompt plus what it has generated so far (nothing is lost; the
restart costs one prefill of those tokens, so it is skipped above `join_budget` tokens).
Requests with other sampling settings wait for the next batch.

Responses leave from a `Relay` thread, never from the generation thread: each token is appended
to its request's list and the relay sends what has piled up (one token at low load, several when
sending is the bottleneck), and polls cancellation on a timer, so generation never waits for IPC.

Sampling with a fixed `random_seed` runs alone, on a freshly created generator:
CTranslate2's sampler uses a random generator per worker thread, seeded once from the
process-wide seed when the thread first samples, so `set_random_seed` only reaches a new
worker. The engine is released and loaded again for it (from the page cache: about 0.1 s
for the default model, seconds for a 13B model; memory stays that of one copy), a cost
paid only by seeded sampling requests; greedy and unseeded requests never pay it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from bayling.errors import InvalidInput
from bayling.params import NO_END_ID
from bayling.model_repository import engine_beam, stepwise
from bayling.model_repository.relay import Outbox, Relay

log = logging.getLogger(__name__)


@dataclass
class EngineRequest:
    request_id: str
    input_ids: list[int]
    max_new_tokens: int
    end_id: int | None = None
    stop_words: list[list[int]] = field(default_factory=list)
    bad_words: list[list[int]] = field(default_factory=list)
    temperature: float = 1.0
    top_k: int = 0               # 0: no top-k limit
    top_p: float = 1.0           # with top_k 0 and top_p 0: greedy, as TensorRT-LLM
    repetition_penalty: float = 1.0
    min_length: int = 0
    random_seed: int | None = None
    streaming: bool = False
    return_log_probs: bool = False
    # decoded step-wise (see stepwise.py): what CTranslate2's generate_batch does not offer
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    embedding_bias: "np.ndarray | None" = None   # [vocab] float32, added to the logits
    return_generation_logits: bool = False
    beam_width: int = 1          # above 1: CTranslate2 beam search (engine_beam.py), answered at the end
    length_penalty: float = 1.0  # beam search only

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or (self.top_k == 0 and self.top_p == 0)

    @property
    def stepwise(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.embedding_bias is not None)

    @property
    def alone(self) -> bool:
        """Runs in a CTranslate2 call of its own: seeded sampling, step-wise decoding, generation logits."""
        return ((self.random_seed is not None and not self.greedy) or self.stepwise or self.return_generation_logits
                or self.beam_width > 1)

    def batch_key(self) -> tuple:
        """Requests with equal keys can share a CTranslate2 call (its sampling options are per call)."""
        sampling = (1, 1.0, 1.0) if self.greedy else (self.top_k, self.top_p, self.temperature)
        seed = None if self.greedy else self.random_seed
        return (sampling, self.repetition_penalty, self.min_length, self.end_id,
                tuple(tuple(w) for w in self.bad_words), self.return_log_probs, self.stepwise,
                self.return_generation_logits, seed, self.beam_width, self.length_penalty)


@dataclass
class Emission:
    """What one response carries: new token ids (all of them when not streaming)."""
    token_ids: list[int]
    log_probs: list[float]
    final: bool
    error: Exception | None = None
    logits: list | None = None       # generation logits, one [vocab] array per token (when asked)
    beams: list | None = None        # beam search: (token ids, log probs) per beam, best first (final only)


Sink = Callable[[Emission], None]


@dataclass
class EngineLoad:
    """How loaded the engine is now: what the endpoint picker balances on and the autoscaler scales on
    (the CPU analogues of TensorRT-LLM's waiting/scheduled requests and KV-cache fraction)."""
    waiting: int                  # submitted, not in the running CTranslate2 batch
    running: int                  # generating in the running batch
    batch_occupancy: float        # running / max batch size
    kv_cache_utilization: float   # tokens the batch's cache holds (padded to its longest sequence, as
                                  # CTranslate2's static batch is) / (max batch size * context), 0..1


# EngineLoad field -> the gauge the CPU `tensorrt_llm` model exports (the chart's picker config reads these)
LOAD_METRICS = {"waiting": ("bayling_engine_waiting_requests", "Requests waiting for the CPU engine's batch"),
                "running": ("bayling_engine_running_requests", "Requests the CPU engine is generating for"),
                "batch_occupancy": ("bayling_engine_batch_occupancy", "Running requests / the CPU engine's max batch"),
                "kv_cache_utilization": ("bayling_engine_kv_cache_utilization",
                                         "Tokens in the CPU engine's batch cache / (max batch * context), 0..1")}


@dataclass(eq=False)
class _Active:
    request: EngineRequest
    sink: Sink
    box: Outbox = None       # what the relay sends: generated[box.sent:box.length]
    generated: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    logits: list = field(default_factory=list)      # only for return_generation_logits
    beams: list | None = None                       # beam search: (ids, log probs) per beam
    error: Exception | None = None
    done: bool = False
    stop_requested: bool = False
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def cancelled(self) -> bool:
        return self.stop_requested or self.box.cancelled


def ends_with_stop_word(generated: list[int], stop_words: list[list[int]]) -> bool:
    """Do the generated ids end with one of the stop words? ([5, 7, 9], [[7, 9]] -> True)"""
    return any(len(w) <= len(generated) and generated[-len(w):] == w for w in stop_words)


def validate_ids(request: EngineRequest, vocab: int) -> None:
    """What every engine refuses: no prompt, ids outside the vocabulary, no tokens to make, top_k above it."""
    if not request.input_ids:
        raise InvalidInput("input_ids", "is empty")
    bad = [t for t in request.input_ids if not 0 <= t < vocab]
    if bad:
        raise InvalidInput("input_ids", f"has ids outside the vocabulary of {vocab}: {bad[:5]}")
    if request.max_new_tokens < 1:
        raise InvalidInput("request_output_len", f"must be at least 1, got {request.max_new_tokens}")
    if request.top_k > vocab:
        raise InvalidInput("runtime_top_k", f"must be at most the vocabulary size {vocab}, got {request.top_k}")
    if request.end_id is not None and not NO_END_ID <= request.end_id < vocab:
        raise InvalidInput("end_id", f"must be a token id below {vocab}, or {NO_END_ID} (no end token), "
                                     f"got {request.end_id}")
    for words, name in ((request.stop_words, "stop_words_list"), (request.bad_words, "bad_words_list")):
        if any(not 0 <= t < vocab for w in words for t in w):
            raise InvalidInput(name, f"has ids outside the vocabulary of {vocab}")


def joinable_min_length(request: EngineRequest) -> EngineRequest:
    """The same request without CTranslate2's min_length where it can go: min_length counts from the start
    of a CTranslate2 call, so a batch with it cannot restart for newcomers. With no end id it suppresses
    nothing; a request that may not end before its last token (min_length >= max_new_tokens, as genai-perf's
    fixed lengths ask) is the same as one whose end id is a bad word. Either then joins running batches."""
    if request.min_length == 0 or request.stepwise or request.beam_width > 1:
        return request
    if request.end_id == NO_END_ID:
        return replace(request, min_length=0)
    if request.end_id is not None and request.min_length >= request.max_new_tokens:
        return replace(request, min_length=0, end_id=NO_END_ID, bad_words=[*request.bad_words, [request.end_id]])
    return request


def seed32(seed: int) -> int:
    """TensorRT-LLM's seeds are 64-bit, CTranslate2's 32-bit: fold the halves together, so that every
    seed works and equal seeds sample alike (2**40 -> 256)."""
    return (seed ^ (seed >> 32)) & 0xFFFFFFFF


class Ct2Engine:
    """`compute_type="default"` runs an engine in the type it was built with (INT8 for `bayling build`'s
    default, float32 for a `--quantization float32` reference build)."""

    def __init__(self, model_dir: str, *, max_batch_size: int = 16, intra_threads: int = 0, inter_threads: int = 1,
                 compute_type: str = "default", gather_ms: float = 2.0, join_budget: int = 4096,
                 cancel_poll_s: float = 0.05, one_token_per_response: bool = False):
        import json
        from pathlib import Path

        import ctranslate2

        self._ct2 = ctranslate2
        self._generator_options = dict(model_path=model_dir, device="cpu", compute_type=compute_type,
                                       intra_threads=intra_threads, inter_threads=inter_threads)
        self.generator = ctranslate2.Generator(**self._generator_options)
        self.vocabulary: list[str] = json.loads((Path(model_dir) / "vocabulary.json").read_text(encoding="utf-8"))
        self.max_batch_size = max_batch_size
        self.gather_s = gather_ms / 1000         # a batch forms once no request came for this long ...
        self.gather_max_s = max(self.gather_s, 0.02)  # ... or this long after the first one waited
        self._last_arrival = 0.0
        self.join_budget = join_budget
        self.one_token_per_response = one_token_per_response   # as TensorRT-LLM streams (benchmarks use it)
        self.restarts = 0
        self.reloads = 0    # generators created for seeded sampling
        self._arrivals = 0  # submissions so far: a cheap "anything new?" check from the callback
        self._pending: deque[_Active] = deque()
        self._by_id: dict[str, _Active] = {}
        self._cond = threading.Condition()
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # recent CTranslate2 batch sizes (tests, metrics)
        self.running: list[_Active] = []                   # the batch generating now (load())
        self.generated_tokens = 0
        self._running = True
        self.relay = Relay(poll_s=cancel_poll_s, name="ct2-relay")
        self._thread = threading.Thread(target=self._loop, name="ct2-scheduler", daemon=True)
        self._thread.start()

    # --- the adapter's side
    def validate(self, request: EngineRequest) -> None:
        vocab = len(self.vocabulary)
        validate_ids(request, vocab)
        if request.embedding_bias is not None and len(request.embedding_bias) != vocab:
            raise InvalidInput("embedding_bias", f"must hold one bias per token of the vocabulary ({vocab}), "
                                                 f"got {len(request.embedding_bias)}")

    def submit(self, request: EngineRequest, sink: Sink, is_cancelled: Callable[[], bool] = lambda: False) -> None:
        self.validate(request)
        request = joinable_min_length(request)
        active = _Active(request, sink)
        active.box = Outbox(lambda start, end, final: self._deliver(active, start, end, final), is_cancelled)
        self.relay.watch(active.box)
        with self._cond:
            if request.request_id:
                self._by_id[request.request_id] = active
            self._pending.append(active)
            self._arrivals += 1
            self._last_arrival = time.monotonic()
            self._cond.notify()

    def stop(self, request_id: str) -> None:
        """TensorRT-LLM's `stop` input: end the request with this id (it gets its final response)."""
        with self._cond:
            active = self._by_id.get(request_id)
            if active is not None:
                active.stop_requested = True

    def shutdown(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify()
        self._thread.join(timeout=30)
        self.relay.stop()

    def load(self, context: int) -> EngineLoad:
        """A snapshot for the load metrics (read from another thread, a few times a second)."""
        running = [a for a in self.running if not a.done]
        longest = max((len(a.request.input_ids) + len(a.generated) for a in running), default=0)
        capacity = max(1, self.max_batch_size * context)
        return EngineLoad(waiting=len(self._pending), running=len(running),
                          batch_occupancy=len(running) / self.max_batch_size,
                          kv_cache_utilization=min(1.0, len(running) * longest / capacity))

    # --- the scheduler thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._running and not self._pending:
                    self._cond.wait()
                if not self._running:
                    for active in self._pending:
                        self._finish(active, error=RuntimeError("the server is shutting down"))
                    return
            self._gather(time.monotonic())  # let requests that arrive together share the batch
            batch = self._take_batch()
            self.running = batch
            if batch:
                try:
                    if self._run(batch):  # stopped to let newcomers join: carry on in front of the queue
                        with self._cond:
                            self._pending.extendleft(reversed([a for a in batch if not a.done]))
                except Exception as exc:  # keep serving: fail this batch's requests, not the model
                    log.exception("generation failed")
                    for active in batch:
                        if not active.done:
                            self._finish(active, error=exc)

    def _settled(self, first_waiting: float) -> bool:
        """Have the requests arriving together all arrived? (None for `gather_s`, or waited long enough.)"""
        now = time.monotonic()
        return now - self._last_arrival >= self.gather_s or now - first_waiting >= self.gather_max_s

    def _gather(self, first_waiting: float) -> None:
        while not self._settled(first_waiting):
            time.sleep(self.gather_s / 4)

    def _take_batch(self) -> list[_Active]:
        with self._cond:
            live = [a for a in self._pending if not a.cancelled]
            for a in self._pending:
                if a not in live:
                    self._finish(a)
            if not live:
                self._pending.clear()
                return []
            key = live[0].request.batch_key()
            limit = 1 if live[0].request.alone else self.max_batch_size
            batch = [a for a in live if a.request.batch_key() == key][:limit]
            self._pending = deque(a for a in live if a not in batch)
            return batch

    def _reseed(self, seed: int) -> None:
        """Replace the generator by one whose worker starts from `seed` (see the module docstring).
        The old one is released first, so the engine is never in memory twice."""
        self.generator = None
        try:
            self._ct2.set_random_seed(seed32(seed))
            self.generator = self._ct2.Generator(**self._generator_options)
        finally:
            if self.generator is None:  # the load failed: try once more, so that the engine keeps serving
                self.generator = self._ct2.Generator(**self._generator_options)
        self.reloads += 1

    def _joinable(self, key: tuple, batch: list[_Active]) -> bool:
        """Is a compatible request waiting, and is restarting the batch for it cheap enough?"""
        with self._cond:
            waiting = any(a.request.batch_key() == key for a in self._pending)
        resume = sum(len(a.request.input_ids) + len(a.generated) for a in batch if not a.done)
        return waiting and resume <= self.join_budget

    def _run(self, batch: list[_Active]) -> bool:
        """Generate for `batch`; True when it stopped early so that waiting requests can join."""
        self.batch_sizes.append(len(batch))
        first = batch[0].request
        if first.stepwise:       # alone, with its own seeded sampler (stepwise.py)
            stepwise.run(self, batch[0])
            return False
        if first.beam_width > 1:
            engine_beam.run(self, batch[0])
            return False
        if first.random_seed is not None and not first.greedy:
            self._reseed(int(first.random_seed))
        generator = self.generator
        vocab = self.vocabulary
        key = first.batch_key()
        # min_length and repetition penalty count tokens since the start of a call: no restarts then
        can_join = (len(batch) < self.max_batch_size and first.min_length == 0 and first.repetition_penalty == 1.0
                    and not first.alone)
        # Generation logits come with CTranslate2's result, after the call: such a request (alone in its
        # call) answers once, at the end, so that its tokens keep the logits of the same decoding steps.
        with_logits = first.return_generation_logits
        finish = (lambda active: None) if with_logits else self._finish
        arrivals = self._arrivals
        newcomer_seen = 0.0    # when an arrival was first noticed (restarts wait for the rest of a burst)
        restart = False
        options = dict(max_length=max(a.request.max_new_tokens - len(a.generated) for a in batch),
                       include_prompt_in_result=False,
                       repetition_penalty=first.repetition_penalty, min_length=first.min_length,
                       return_scores=first.return_log_probs,  # steps carry log probs only with scores on
                       return_logits_vocab=with_logits)
        if first.greedy:
            options.update(sampling_topk=1)
        else:
            options.update(sampling_topk=first.top_k, sampling_topp=first.top_p or 1.0,
                           sampling_temperature=first.temperature)
        if first.end_id is not None:
            options["end_token"] = [] if first.end_id == NO_END_ID else [first.end_id]
        if first.bad_words:
            options["suppress_sequences"] = [[vocab[t] for t in w] for w in first.bad_words]

        # CTranslate2 forwards prompts at once only up to the shortest one in the batch; the rest of a
        # longer prompt is forced step by step: those steps are numbered (a longer prompt's first generated
        # token is step `forced`) and, where they reach the callback at all, are not generated tokens.
        prompts = [len(a.request.input_ids) + len(a.generated) for a in batch]
        forced = [n - min(prompts) for n in prompts]
        options["max_length"] += max(forced)

        def on_token(step) -> bool:
            nonlocal arrivals, restart, newcomer_seen
            active = batch[step.batch_id]
            if active.done or restart:
                return True  # (a restart regenerates this step's token)
            if step.step < forced[step.batch_id]:
                return False   # a forced prompt step; CTranslate2 4.8 mostly skips them, numbering on
            if can_join and self._arrivals != arrivals:
                newcomer_seen = newcomer_seen or time.monotonic()
                if self._settled(newcomer_seen):
                    arrivals, newcomer_seen = self._arrivals, 0.0
                    if self._joinable(key, batch):
                        restart = True
                        self.restarts += 1
                        return True
            request = active.request
            if request.end_id is not None and step.token_id == request.end_id:
                finish(active)
                return True
            active.generated.append(step.token_id)
            self.generated_tokens += 1
            active.log_probs.append(step.log_prob or 0.0)
            n = len(active.generated)
            if n >= request.max_new_tokens or step.is_last or active.cancelled or ends_with_stop_word(active.generated, active.request.stop_words):
                finish(active)
                return True
            if request.streaming and not with_logits:
                active.box.length = n
                self.relay.wake(active.box)
            return False

        results = generator.generate_batch([[vocab[t] for t in a.request.input_ids + a.generated] for a in batch],
                                           callback=on_token, **options)
        if with_logits:
            rows = np.asarray(results[0].logits[0]).reshape(-1, len(vocab))
            batch[0].logits = list(rows[:len(batch[0].generated)])
        if restart:
            return True
        for active in batch:
            if not active.done:
                self._finish(active)
        return False

    def _deliver(self, active: _Active, start: int, end: int, final: bool) -> None:
        """In the relay thread: one response with the tokens [start, end) (or one per token)."""
        try:
            if self.one_token_per_response and active.request.streaming:
                for i in range(start, end - 1 if final else end):
                    active.sink(Emission(active.generated[i:i + 1], active.log_probs[i:i + 1], False,
                                         logits=active.logits[i:i + 1] or None))
                start = max(start, end - 1) if final else end
                if not final:
                    return
            active.sink(Emission(active.generated[start:end], active.log_probs[start:end], final,
                                 active.error if final else None, active.logits[start:end] or None,
                                 active.beams if final else None))
        except Exception:  # typically the client went away: stop generating for it (the relay closes it)
            active.done = True
            raise

    def _finish(self, active: _Active, error: Exception | None = None) -> None:
        if active.done:
            return
        active.error = error
        active.done = True
        active.box.length = len(active.generated)
        active.box.final = True
        self.relay.wake(active.box)
        with self._cond:
            if self._by_id.get(active.request.request_id) is active:
                del self._by_id[active.request.request_id]

