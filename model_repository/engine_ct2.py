"""The CPU engine behind the `tensorrt_llm` model: CTranslate2 INT8 generation with batching.

It speaks TensorRT-LLM's contract (see `bayling.contract.ENGINE_INPUTS`): the Triton
adapter turns each request into an `EngineRequest` and each `Emission` back into
`output_ids` / `sequence_length`. Concurrent requests that share sampling settings run as
one CTranslate2 batch; each request stops on its own (its length, end id, stop words,
cancellation) through the per-token callback, while the rest of its batch goes on.

CTranslate2 batches are static (a batch runs until its last member ends). So that a request
arriving while a batch runs does not wait for the whole batch, a compatible newcomer joins
it: the running batch stops at its next step and restarts with the newcomer, each running
request carrying on from its prompt plus what it has generated so far (nothing is lost). The
restart costs a prefill of those tokens (skipped above `join_budget` tokens), and more: CTranslate2
forwards a batch's prompts at once only up to the shortest, and forces the rest one decoding step at
a time, so a newcomer joining answers 120 tokens along stalls them for 120 steps. A join that
forces more than `join_steps` steps is taken only when no lane is idle. Requests with other sampling
settings wait for the next batch.

With `lanes` above 1 there are that many batches at once, each on its own CTranslate2 worker (one
copy of the weights; `inter_threads` = lanes): a newcomer starts a batch in an idle lane while fewer
than `join_lanes` are busy (on a small model two single-threaded batches make more tokens/s on two
cores than one batch on both), joins the compatible running batch it costs the fewest forced steps
once that many are (or starts its own where every join would stall a batch), and takes a spare lane
when it can join none (a repetition penalty or `min_length`, other sampling settings), so that it
does not wait for another request's whole answer. `_plan` is that rule.

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
class _Lane:
    """One CTranslate2 batch slot: the batch it generates now (empty when idle)."""
    index: int
    batch: list = field(default_factory=list)
    generating: bool = False

    def live(self) -> list["_Active"]:
        return [a for a in self.batch if not a.done]

    @property
    def key(self) -> tuple | None:
        return self.batch[0].key if self.batch else None

    @property
    def restartable(self) -> bool:
        """May its batch stop at a step so that newcomers join? (see `_generate`)"""
        return bool(self.batch) and restartable(self.batch[0].request)


@dataclass(eq=False)
class _Active:
    request: EngineRequest
    sink: Sink
    key: tuple = ()          # request.batch_key(), computed once
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

    @property
    def length(self) -> int:
        """Prompt plus generated tokens: what a restart forwards again, and what its cache holds."""
        return len(self.request.input_ids) + len(self.generated)


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


def restartable(request: EngineRequest) -> bool:
    """Can a batch of such requests stop at a step and go on from prompt + generated? Not with min_length or
    a repetition penalty: CTranslate2 counts both from the start of a call (the penalty spares the prompt)."""
    return request.min_length == 0 and request.repetition_penalty == 1.0 and not request.alone


def _lengths(batch: list["_Active"]) -> tuple[int, int]:
    lengths = [a.length for a in batch] or [0]
    return min(lengths), max(lengths)


def _forced_steps(span: tuple[int, int], prompt: int) -> int:
    """Steps a restarted batch spends forcing prompts rather than generating, once a newcomer with this
    prompt joins: CTranslate2 forwards all prompts at once only up to the shortest."""
    low, high = span
    return max(high, prompt) - min(low, prompt)


def seed32(seed: int) -> int:
    """TensorRT-LLM's seeds are 64-bit, CTranslate2's 32-bit: fold the halves together, so that every
    seed works and equal seeds sample alike (2**40 -> 256)."""
    return (seed ^ (seed >> 32)) & 0xFFFFFFFF


class ResponsesMixin:
    """What the CPU engines share on the response side: `stop` by request id, and the relay's delivery of a
    request's tokens. Needs `relay`, `one_token_per_response`, `_cond` and `_by_id` (request id -> active)."""

    def _watch(self, active: _Active, is_cancelled: Callable[[], bool]) -> None:
        active.box = Outbox(lambda start, end, final: self._deliver(active, start, end, final), is_cancelled)
        self.relay.watch(active.box)

    def stop(self, request_id: str) -> None:
        """TensorRT-LLM's `stop` input: end the request with this id (it gets its final response)."""
        with self._cond:
            active = self._by_id.get(request_id)
            if active is not None:
                active.stop_requested = True

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


class Ct2Engine(ResponsesMixin):
    """`compute_type="default"` runs an engine in the type it was built with (INT8 for `bayling build`'s
    default, float32 for a `--quantization float32` reference build)."""

    def __init__(self, model_dir: str, *, max_batch_size: int = 16, intra_threads: int = 0, lanes: int = 1,
                 join_lanes: int = 0, compute_type: str = "default", gather_ms: float = 2.0, join_budget: int = 4096,
                 join_steps: int = 16, cancel_poll_s: float = 0.05, one_token_per_response: bool = False):
        import json
        from pathlib import Path

        import ctranslate2

        self._ct2 = ctranslate2
        self._generator_options = dict(model_path=model_dir, device="cpu", compute_type=compute_type,
                                       intra_threads=intra_threads, inter_threads=lanes)
        self.generator = ctranslate2.Generator(**self._generator_options)
        self.vocabulary: list[str] = json.loads((Path(model_dir) / "vocabulary.json").read_text(encoding="utf-8"))
        self.max_batch_size = max_batch_size     # requests generating at once, in all lanes together
        self.lanes = [_Lane(i) for i in range(lanes)]
        self.join_lanes = min(lanes, join_lanes or lanes)
        self.gather_s = gather_ms / 1000         # a batch forms once no request came for this long ...
        self.gather_max_s = max(self.gather_s, 0.02)  # ... or this long after the first one waited
        self._last_arrival = 0.0
        self.join_budget = join_budget
        self.join_steps = join_steps   # forced steps a join may cost while an idle lane could start it instead
        self.one_token_per_response = one_token_per_response   # as TensorRT-LLM streams (benchmarks use it)
        self.restarts = 0
        self.reloads = 0    # generators created for seeded sampling
        self._changes = 0   # arrivals and lane changes so far: a cheap "anything new?" check from the callback
        self._exclusive: _Lane | None = None  # the lane reloading the generator (seeded sampling) ...
        self._exclusive_wanted = 0            # ... and how many lanes wait to: the others hold back meanwhile
        self._pending: deque[_Active] = deque()
        self._by_id: dict[str, _Active] = {}
        self._cond = threading.Condition()
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # recent CTranslate2 batch sizes (tests, metrics)
        self.generated_tokens = 0
        self._running = True
        self.relay = Relay(poll_s=cancel_poll_s, name="ct2-relay")
        self._threads = [threading.Thread(target=self._loop, args=(lane,), name=f"ct2-lane-{lane.index}", daemon=True)
                         for lane in self.lanes]
        for thread in self._threads:
            thread.start()

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
        active = _Active(request, sink, key=request.batch_key())
        self._watch(active, is_cancelled)
        with self._cond:
            if request.request_id:
                self._by_id[request.request_id] = active
            self._pending.append(active)
            self._changes += 1
            self._last_arrival = time.monotonic()
            self._cond.notify_all()

    def shutdown(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)
        self.relay.stop()

    @property
    def running(self) -> list[_Active]:
        return [a for lane in self.lanes for a in lane.live()]

    def load(self, context: int) -> EngineLoad:
        """A snapshot for the load metrics (read from another thread, a few times a second)."""
        live = [lane.live() for lane in self.lanes]
        running = sum(map(len, live))
        held = sum(len(batch) * max((a.length for a in batch), default=0)
                   for batch in live)   # each lane's cache is padded to its longest sequence
        capacity = max(1, self.max_batch_size * context)
        return EngineLoad(waiting=len(self._pending), running=running,
                          batch_occupancy=running / self.max_batch_size,
                          kv_cache_utilization=min(1.0, held / capacity))

    # --- the scheduler: one thread per lane
    def _loop(self, lane: _Lane) -> None:
        carry: list[_Active] = []     # this lane's requests after it stopped for newcomers
        while True:
            with self._cond:
                while self._running and (self._held_back(lane) or not (carry or self._plan()[1])):
                    self._cond.wait()
                if not self._running:
                    for active in [*carry, *self._pending]:
                        self._finish(active, error=RuntimeError("the server is shutting down"))
                    self._pending.clear()
                    return
            if not carry:
                self._gather(time.monotonic())  # let requests that arrive together share the batch
            with self._cond:
                if self._held_back(lane):
                    continue
                batch, carry = self._take(lane, carry), []
                if not batch:
                    continue
                lane.batch, lane.generating = batch, True
                self._changes += 1
            try:
                if self._run(lane, batch):  # stopped to let newcomers join: carry on with them
                    carry = [a for a in batch if not a.done]
            except Exception as exc:  # keep serving: fail this batch's requests, not the model
                log.exception("generation failed")
                for active in batch:
                    if not active.done:
                        self._finish(active, error=exc)
            finally:
                with self._cond:
                    lane.generating = False
                    if not carry:
                        lane.batch = []
                    self._changes += 1
                    self._cond.notify_all()

    def _held_back(self, lane: _Lane) -> bool:
        """Another lane reloads the generator (or waits to): start nothing meanwhile."""
        return self._exclusive_wanted > 0 or self._exclusive not in (None, lane)

    def _plan(self) -> tuple[dict[int, list[_Active]], list[_Active]]:
        """Under the lock: which waiting requests join which running lane, and which start a batch of their
        own in an idle lane. While fewer than `join_lanes` lanes are busy a newcomer starts a batch; then it
        joins the compatible running batch it costs the fewest forced steps (see `_generate`), if at most
        `join_steps`; else it starts a batch in an idle lane; with none idle it joins whichever is cheapest.
        A request that can join no batch takes an idle lane. Worked example, 64-token prompts, `join_steps`
        16: a lane 5 tokens into its answers takes a newcomer for 5 forced steps; one 120 tokens in would
        stall 120 steps, so the newcomer starts in an idle lane instead."""
        busy = [lane for lane in self.lanes if lane.batch]
        idle = len(self.lanes) - len(busy)
        load = {lane.index: len(lane.live()) for lane in busy}
        spans = {lane.index: _lengths(lane.live()) for lane in busy}   # (shortest, longest) prompt + generated
        total = sum(load.values())
        joinable = [lane for lane in busy if lane.restartable and self._resume_tokens(lane) <= self.join_budget]
        joins: dict[int, list[_Active]] = {}
        opens: list[_Active] = []
        for active in self._pending:
            if total >= self.max_batch_size:
                break
            n = len(active.request.input_ids)
            cost = {lane.index: _forced_steps(spans[lane.index], n) for lane in joinable
                    if lane.key == active.key and load[lane.index] < self.max_batch_size}
            cheap = [i for i, steps in cost.items() if steps <= self.join_steps]
            if cost and len(busy) >= self.join_lanes and (cheap or not idle):
                target = min(cheap or cost, key=lambda i: (cost[i], load[i]))
                joins.setdefault(target, []).append(active)
                load[target] += 1
                low, high = spans[target]
                spans[target] = (min(low, n), max(high, n))
            elif idle:
                opens.append(active)
            else:
                continue
            total += 1
        return joins, opens

    @staticmethod
    def _resume_tokens(lane: _Lane) -> int:
        """What restarting the lane's batch would prefill again."""
        return sum(a.length for a in lane.live())

    def _settled(self, first_waiting: float) -> bool:
        """Have the requests arriving together all arrived? (None for `gather_s`, or waited long enough.)"""
        now = time.monotonic()
        return now - self._last_arrival >= self.gather_s or now - first_waiting >= self.gather_max_s

    def _gather(self, first_waiting: float) -> None:
        while not self._settled(first_waiting):
            time.sleep(self.gather_s / 4)

    def _take(self, lane: _Lane, carry: list[_Active]) -> list[_Active]:
        """Under the lock: the lane's next batch: what it carries on with plus the newcomers that join it,
        or (idle) the first waiting request with its compatible followers, up to an even share of what
        runs and waits over the join lanes (1 running + 15 arriving on 2 join lanes: this lane takes 8)."""
        for active in [a for a in self._pending if a.cancelled]:
            self._finish(active)
        self._pending = deque(a for a in self._pending if not a.done)
        joins, opens = self._plan()
        if carry:
            batch = carry + joins.get(lane.index, [])
        elif not opens:
            return []
        elif opens[0].request.alone:
            batch = opens[:1]
        else:
            same = [a for a in opens if a.key == opens[0].key]
            running = sum(len(other.live()) for other in self.lanes)
            batch = same[:-(-(running + len(same)) // self.join_lanes)]   # an even share; the rest join later
        self._pending = deque(a for a in self._pending if a not in batch)
        return batch

    def _reseed(self, lane: _Lane, seed: int) -> None:
        """Replace the generator by one whose workers start from `seed` (see the module docstring), while no
        other lane generates. The old one is released first, so the engine is never in memory twice."""
        with self._cond:
            lane.generating = False
            self._exclusive_wanted += 1
            self._changes += 1       # restartable lanes stop at their next step (see `_generate`)
            while self._exclusive is not None or any(other.generating for other in self.lanes if other is not lane):
                self._cond.wait()
            self._exclusive, lane.generating = lane, True
            self._exclusive_wanted -= 1
        self.generator = None
        try:
            self._ct2.set_random_seed(seed32(seed))
            self.generator = self._ct2.Generator(**self._generator_options)
        finally:
            if self.generator is None:  # the load failed: try once more, so that the engine keeps serving
                self.generator = self._ct2.Generator(**self._generator_options)
        self.reloads += 1

    def _release(self, lane: _Lane) -> None:
        with self._cond:
            if self._exclusive is lane:
                self._exclusive = None
                self._cond.notify_all()

    def _should_yield(self, lane: _Lane) -> bool:
        """Should the lane's batch stop at this step: newcomers join it, or another lane reloads?"""
        with self._cond:
            return bool(self._exclusive_wanted) or lane.index in self._plan()[0]   # (the plan applies join_budget)

    def _run(self, lane: _Lane, batch: list[_Active]) -> bool:
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
            self._reseed(lane, int(first.random_seed))
            try:
                return self._generate(lane, batch)
            finally:
                self._release(lane)
        return self._generate(lane, batch)

    def _generate(self, lane: _Lane, batch: list[_Active]) -> bool:
        first = batch[0].request
        generator = self.generator
        vocab = self.vocabulary
        can_join = lane.restartable
        # Generation logits come with CTranslate2's result, after the call: such a request (alone in its
        # call) answers once, at the end, so that its tokens keep the logits of the same decoding steps.
        with_logits = first.return_generation_logits
        finish = (lambda active: None) if with_logits else self._finish
        changes = -1    # check once at the first step: requests may have come since the batch was taken
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
        prompts = [a.length for a in batch]
        forced = [n - min(prompts) for n in prompts]
        options["max_length"] += max(forced)

        def on_token(step) -> bool:
            nonlocal changes, restart, newcomer_seen
            active = batch[step.batch_id]
            if active.done or restart:
                return True  # (a restart regenerates this step's token)
            if step.step < forced[step.batch_id]:
                return False   # a forced prompt step; CTranslate2 4.8 mostly skips them, numbering on
            if can_join and self._changes != changes:
                newcomer_seen = newcomer_seen or time.monotonic()
                if self._settled(newcomer_seen):
                    changes, newcomer_seen = self._changes, 0.0
                    if self._should_yield(lane):
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
