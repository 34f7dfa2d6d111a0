"""The llama.cpp CPU engine behind the `tensorrt_llm` model: continuous batching over a GGUF Q8_0 model.

The same contract as `engine_ct2.Ct2Engine` (validate, submit, stop, load, shutdown; `EngineRequest` in,
`Emission` out), scheduled as a serving engine does it. Every sequence owns a slot of llama.cpp's KV
cache (a sequence id), and one scheduler thread runs decoding steps. Each step is one `llama_decode` of
one batch that holds:

- the next token of every sequence that is generating, and
- a chunk of each newcomer's prompt (all of it when short; `prefill_chunk` tokens per step at most, so
  that a long prompt never stalls the others for long).

So a newcomer's first token comes one step plus its own prefill after it arrives, whatever runs.
A sequence that ends (its length, end id, stop word, cancellation, `stop`) frees its slot at once, and
the next step already has a waiting request in it. Nothing is restarted or recomputed.

Per request, at each step, on its row of logits: embedding bias, OpenAI presence/frequency penalties,
the repetition penalty, min_length and bad words (`stepwise.adjusted`, done only for requests that ask
for any of them), then the choice: greedy (one vectorised argmax for all greedy rows), or llama.cpp's
own samplers (temperature, top_k, top_p, then a draw from a generator seeded per request, so equal
seeds give equal answers whatever else runs). Log probs are the model's own (log-softmax of the raw
row), computed only for requests that ask for them.

Responses leave from the shared `Relay` thread (see `relay.py`), never from the decoding thread.
llama.cpp releases the GIL in `llama_decode` (a ctypes call), so the relay sends while the next step
is computed.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from bayling.errors import InvalidInput
from bayling.model_repository import stepwise
from bayling.model_repository.engine_ct2 import (EngineLoad, EngineRequest, ResponsesMixin, Sink, _Active,
                                                 ends_with_stop_word, seed32, validate_ids)
from bayling.model_repository.relay import Relay

log = logging.getLogger(__name__)

_BACKEND = threading.Lock()
_backend_ready = False


def _llama():
    """llama.cpp's C API (llama-cpp-python's ctypes bindings), its backend started once per process."""
    global _backend_ready
    import llama_cpp.llama_cpp as llama

    with _BACKEND:
        if not _backend_ready:
            llama.llama_log_set(_QUIET, ctypes.c_void_p(0))
            llama.llama_backend_init()
            _backend_ready = True
    return llama


def _quiet(level, text, user_data):   # llama.cpp logs every load at length; keep warnings and errors
    if level in (3, 4):   # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
        log.warning("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())


try:
    import llama_cpp.llama_cpp as _bindings
    _QUIET = _bindings.llama_log_callback(_quiet)
except ImportError:   # the engine is optional: importing this module must not need llama.cpp
    _QUIET = None


class LlamaModel:
    """One GGUF model with a context of `slots` sequences of `context` tokens each, and a reusable batch of
    `batch_tokens` whose arrays are numpy views (filled without a Python loop per token)."""

    def __init__(self, path: str, *, slots: int, context: int, threads: int, batch_tokens: int = 512,
                 unified: bool = False):
        llama = self._llama = _llama()
        params = llama.llama_model_default_params()
        self.model = llama.llama_model_load_from_file(path.encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cparams = llama.llama_context_default_params()
        cparams.n_ctx = context if unified else context * slots
        cparams.n_batch = cparams.n_ubatch = batch_tokens
        cparams.n_seq_max = slots
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.kv_unified = unified    # False: each sequence attends over its own cache, not all of them
        cparams.no_perf = True
        self.ctx = llama.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context of {slots} x {context} tokens for {path}")
        self.vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self.model))
        self.memory = llama.llama_get_memory(self.ctx)
        self.capacity = batch_tokens
        self.tokens = np.zeros(batch_tokens, np.int32)
        self.positions = np.zeros(batch_tokens, np.int32)
        self.seq_ids = np.zeros(batch_tokens, np.int32)
        self.wants_logits = np.zeros(batch_tokens, np.int8)
        self._n_seq = np.ones(batch_tokens, np.int32)
        int32_p = ctypes.POINTER(ctypes.c_int32)
        self._seq_ptrs = (int32_p * batch_tokens)(*[ctypes.cast(self.seq_ids.ctypes.data + 4 * i, int32_p)
                                                     for i in range(batch_tokens)])
        self.batch = llama.llama_batch(
            n_tokens=0, token=self.tokens.ctypes.data_as(int32_p), embd=None,
            pos=self.positions.ctypes.data_as(int32_p), n_seq_id=self._n_seq.ctypes.data_as(int32_p),
            seq_id=self._seq_ptrs, logits=self.wants_logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)))

    def decode(self, n_tokens: int) -> int:
        """Run the first `n_tokens` entries of the batch; 0 on success (llama_decode's return code)."""
        self.batch.n_tokens = n_tokens
        return self._llama.llama_decode(self.ctx, self.batch)

    def logits(self, rows: int) -> np.ndarray:
        """[rows, vocab] float32, a writable view: one row per batch entry that asked for logits, in order."""
        return np.ctypeslib.as_array(self._llama.llama_get_logits(self.ctx), shape=(rows, self.vocab))

    def forget(self, seq: int, start: int = 0) -> None:
        """Drop the sequence's cache from position `start` on (0: all of it)."""
        self._llama.llama_memory_seq_rm(self.memory, seq, start if start > 0 else -1, -1)

    def copy(self, source: int, target: int) -> None:
        """Make `target`'s cache a copy of `source`'s. With a cache per sequence llama.cpp copies the whole
        buffer (all positions), at the start of the next `decode`; trim the copy with `forget`."""
        self._llama.llama_memory_seq_cp(self.memory, source, target, -1, -1)

    def decode_prompt(self, prompt: list[int], seq: int = 0) -> np.ndarray:
        """The logits after `prompt` (one call; used to check a freshly built file)."""
        n = len(prompt)
        self.tokens[:n], self.positions[:n], self.seq_ids[:n] = prompt, np.arange(n), seq
        self.wants_logits[:n] = 0
        self.wants_logits[n - 1] = 1
        if self.decode(n) != 0:
            raise RuntimeError("llama_decode failed")
        out = self.logits(1)[0].copy()
        self.forget(seq)
        return out

    def sampler(self, request: EngineRequest):
        """llama.cpp's sampler chain for a sampling request: temperature, top_k, top_p, a seeded draw."""
        llama = self._llama
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(request.temperature))
        if request.top_k > 0:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_k(request.top_k))
        if 0 < request.top_p < 1:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_p(request.top_p, 1))
        seed = seed32(int(request.random_seed)) if request.random_seed is not None else llama.LLAMA_DEFAULT_SEED
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_dist(seed))
        return chain

    def sample(self, chain, batch_index: int) -> int:
        """Draw from the logits of the batch entry `batch_index` (as changed in place by the caller)."""
        return self._llama.llama_sampler_sample(chain, self.ctx, batch_index)

    def free_sampler(self, chain) -> None:
        self._llama.llama_sampler_free(chain)

    def close(self) -> None:
        if self.ctx:
            self._llama.llama_free(self.ctx)
            self._llama.llama_model_free(self.model)
            self.ctx = self.model = None

    def __enter__(self) -> "LlamaModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(eq=False)
class _Sequence(_Active):
    slot: int = -1
    fed: int = 0             # prompt tokens already in the cache
    decoded: int = 0         # generated tokens fed back (all but the newest)
    sampler: object = None   # llama.cpp sampler chain (sampling requests only)
    context_ids: list | None = None   # prompt + generated, kept only for penalties and bad words
    counts: "np.ndarray | None" = None   # generated-token counts, only for presence/frequency penalties

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.request.input_ids)

    def cached_tokens(self) -> list[int]:
        """The tokens its slot's cache holds: the prompt fed so far, then the generated ones fed back."""
        return self.request.input_ids[:self.fed] + self.generated[:self.decoded]

    @property
    def adjusts_logits(self) -> bool:
        r = self.request
        return bool(r.embedding_bias is not None or r.presence_penalty or r.frequency_penalty or r.bad_words
                    or r.repetition_penalty != 1.0 or (r.min_length > len(self.generated) and r.end_id not in (None, -1)))


def shared_prefix(tokens, prompt: list[int]) -> int:
    """How many leading tokens `tokens` and `prompt` share, leaving the prompt's last one to decode (its
    logits give the first token): ([1, 2, 3, 9], [1, 2, 3, 4]) -> 3; ([1, 2, 3], [1, 2, 3]) -> 2."""
    n = 0
    for a, b in zip(tokens, prompt):
        if a != b:
            break
        n += 1
    return min(n, len(prompt) - 1)


class LlamaCppEngine(ResponsesMixin):
    name = "llama.cpp"

    def __init__(self, model_path: str, *, context: int, max_batch_size: int = 16, threads: int = 0,
                 prefill_chunk: int = 256, cancel_poll_s: float = 0.05, one_token_per_response: bool = False):
        from bayling.model_repository.render import available_cores

        self.context = context
        self.max_batch_size = max_batch_size
        self.threads = threads or available_cores()
        self.prefill_chunk = prefill_chunk
        self.model = LlamaModel(model_path, slots=max_batch_size, context=context, threads=self.threads,
                                batch_tokens=max(prefill_chunk, max_batch_size) + max_batch_size)
        self.vocab_size = self.model.vocab
        self.one_token_per_response = one_token_per_response
        self.generated_tokens = 0
        self.steps = 0
        self.batch_sizes: deque[int] = deque(maxlen=1000)   # sequences per step (tests, metrics)
        self._free_slots = list(range(max_batch_size - 1, -1, -1))
        self._cached: dict[int, list[int]] = {}   # free slot -> the tokens its cache still holds
        self.reused_tokens = 0                     # prompt tokens not prefilled thanks to them
        self.copied_prefixes = 0                   # newcomers that got their prefix from another slot
        self.prefilled_tokens = 0                  # prompt tokens computed
        # A copy moves a whole per-sequence buffer: worth it from this many shared tokens on (measured,
        # default model: copy and an 8-token tail 50 ms at 2,048 tokens a slot, 88 ms at 8,192; a 91-token
        # prefill 211-342 ms, about 3 ms a token)
        self.copy_min_tokens = max(16, context // 128)
        self._pending: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._by_id: dict[str, _Sequence] = {}
        self._cond = threading.Condition()
        self._open = True
        self.relay = Relay(poll_s=cancel_poll_s, name="llamacpp-relay")
        self._thread = threading.Thread(target=self._loop, name="llamacpp-steps", daemon=True)
        self._thread.start()

    # --- the adapter's side
    def validate(self, request: EngineRequest) -> None:
        validate_ids(request, self.vocab_size)
        if request.beam_width > 1:
            raise InvalidInput("beam_width", "the llama.cpp CPU engine does not do beam search; use beam_width 1, "
                                             "or an engine built with --target cpu-ct2")
        if len(request.input_ids) >= self.context:
            raise InvalidInput("input_ids", f"has {len(request.input_ids)} tokens; the engine's context is "
                                            f"{self.context}, prompt and answer together")
        if request.embedding_bias is not None and len(request.embedding_bias) != self.vocab_size:
            raise InvalidInput("embedding_bias", f"must hold one bias per token of the vocabulary "
                                                 f"({self.vocab_size}), got {len(request.embedding_bias)}")

    def submit(self, request: EngineRequest, sink: Sink, is_cancelled: Callable[[], bool] = lambda: False) -> None:
        self.validate(request)
        sequence = _Sequence(request, sink)
        self._watch(sequence, is_cancelled)
        with self._cond:
            if request.request_id:
                self._by_id[request.request_id] = sequence
            self._pending.append(sequence)
            self._cond.notify_all()

    def shutdown(self) -> None:
        with self._cond:
            self._open = False
            self._cond.notify_all()
        self._thread.join(timeout=30)
        self.relay.stop()
        self.model.close()

    def load(self, context: int | None = None) -> EngineLoad:
        """A snapshot for the load metrics (read from another thread, a few times a second)."""
        running = list(self._running)
        held = sum(s.fed + len(s.generated) for s in running)
        return EngineLoad(waiting=len(self._pending), running=len(running),
                          batch_occupancy=len(running) / self.max_batch_size,
                          kv_cache_utilization=min(1.0, held / (self.max_batch_size * self.context)))

    # --- the decoding thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._open and not self._pending and not self._running:
                    self._cond.wait()
                if not self._open:
                    for sequence in [*self._running, *self._pending]:
                        self._finish(sequence, error=RuntimeError("the server is shutting down"))
                    return
                self._admit()
            try:
                self._step()
            except Exception as exc:   # keep serving: fail what was in this step, not the model
                log.exception("decoding step failed")
                for sequence in list(self._running):
                    self._end(sequence, error=exc)

    def _admit(self) -> None:
        """Under the lock: waiting requests take free slots, in arrival order. A request whose prompt
        begins as one still being prefilled waits for that prefill (a step or so), then copies it: sixteen
        chats with one system prompt arriving together prefill it once, not sixteen times."""
        waiting = []
        while self._pending and self._free_slots:
            sequence = self._pending.popleft()
            if sequence.cancelled:
                self._finish(sequence)
                continue
            held = self._held_prefixes(sequence.request.input_ids)
            if self._prefix_in_progress(sequence.request.input_ids, held):
                waiting.append(sequence)
                continue
            self._take_slot(sequence, held)
            request = sequence.request
            if not request.greedy:
                sequence.sampler = self.model.sampler(request)
            if request.repetition_penalty != 1.0 or request.bad_words:
                sequence.context_ids = list(request.input_ids)
            if request.presence_penalty or request.frequency_penalty:
                sequence.counts = np.zeros(self.vocab_size, np.float32)
            self._running.append(sequence)
        self._pending.extendleft(reversed(waiting))

    def _take_slot(self, sequence: _Sequence, held: dict[int, int]) -> None:
        """Prefix reuse: a finished sequence's cache stays in its slot, and a newcomer takes the free slot
        whose cache shares the longest prefix with its prompt (a system prompt, the turns of a chat so far),
        prefilling only the rest. One prompt token is always left to decode, for the first token's logits.
        Worked example: cached [s1 s2 u1 a1], prompt [s1 s2 u2]: the slot keeps s1 s2, prefills u2.
        When another slot (running, or free) holds a longer prefix, the newcomer's slot gets a copy of it.
        `held`: slot -> prefix shared with the prompt (`_held_prefixes`)."""
        # ties (no cache, or the same shared prefix) go to the lowest slot: see _step on keeping them packed
        best = max(self._free_slots, key=lambda slot: (held.get(slot, 0), -slot))
        self._free_slots.remove(best)
        self._cached.pop(best, None)
        keep = held.get(best, 0)
        source = max((slot for slot in held if slot != best), key=held.__getitem__, default=None)
        if source is not None and held[source] >= keep + self.copy_min_tokens:
            self.model.copy(source, best)
            self.copied_prefixes += 1
            keep = held[source]
        self.model.forget(best, keep)
        sequence.slot, sequence.fed = best, keep
        self.reused_tokens += keep

    def _held_prefixes(self, prompt: list[int]) -> dict[int, int]:
        """Slot -> how long a prefix of `prompt` its cache holds, for every slot that holds any tokens: the
        running sequences' (what they have fed so far) and the free slots' (what their last one left)."""
        held = {s.slot: shared_prefix(s.cached_tokens(), prompt) for s in self._running}
        for slot, tokens in self._cached.items():
            held[slot] = shared_prefix(tokens, prompt)
        return held

    def _prefix_in_progress(self, prompt: list[int], held: dict[int, int]) -> bool:
        """Whether a sequence still prefilling will soon hold a prefix of `prompt` worth copying, longer than
        any cache holds now."""
        coming = max((shared_prefix(s.request.input_ids, prompt) for s in self._running if s.prefilling), default=0)
        return coming >= max(held.values(), default=0) + self.copy_min_tokens

    def _step(self) -> None:
        """One llama_decode: the next token of every generating sequence, and prompt chunks of newcomers."""
        model = self.model
        for sequence in [s for s in self._running if s.cancelled]:
            self._end(sequence)
        n, outputs, rows = 0, [], []   # the sequences whose logits this step yields, and their batch indexes
        budget = self.prefill_chunk
        # In slot order: llama.cpp splits a batch into one pass per run of consecutive sequence ids (with a
        # cache per sequence), so slots 15, 3, 7 cost three passes where 0, 1, 2 cost one (measured, 16
        # sequences of the default model: 275 ms a step in reverse order, 86 ms in order; 8 sequences in
        # even slots 128 ms, in slots 0-7 51 ms). Hence also the lowest free slot for a newcomer.
        self._running.sort(key=lambda s: s.slot)
        for sequence in self._running:
            prompt = sequence.request.input_ids
            if sequence.prefilling:
                take = min(len(prompt) - sequence.fed, budget)
                if take == 0:
                    continue
                budget -= take
                self.prefilled_tokens += take
                start = sequence.fed
                model.tokens[n:n + take] = prompt[start:start + take]
                model.positions[n:n + take] = np.arange(start, start + take)
                sequence.fed += take
                last = not sequence.prefilling
            else:
                take = 1
                sequence.decoded += 1
                model.tokens[n] = sequence.generated[-1]
                model.positions[n] = len(prompt) + len(sequence.generated) - 1
                last = True
            model.seq_ids[n:n + take] = sequence.slot
            model.wants_logits[n:n + take] = 0
            if last:
                model.wants_logits[n + take - 1] = 1
                outputs.append(sequence)
                rows.append(n + take - 1)
            n += take
        if n == 0:
            return
        self.batch_sizes.append(len(outputs))
        code = model.decode(n)
        self.steps += 1
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")
        if outputs:
            self._choose(outputs, rows, model.logits(len(outputs)))

    def _choose(self, outputs: list[_Sequence], batch_rows: list[int], logits: np.ndarray) -> None:
        """Pick each sequence's next token from its row of logits (changed in place where the request asks)."""
        greedy_rows = []
        chosen = [0] * len(outputs)
        for row, sequence in enumerate(outputs):
            request = sequence.request
            raw = logits[row]
            if request.return_generation_logits:
                sequence.logits.append(raw.copy())
            adjust = sequence.adjusts_logits
            if request.return_log_probs:   # the model's own distribution: kept before any change to the row
                sequence.log_probs.append(raw.copy() if adjust else raw)   # replaced by one float in _accept
            if adjust:
                raw[:] = stepwise.adjusted(raw, request, sequence.context_ids or [], sequence.counts,
                                           len(sequence.generated))
            if request.greedy:
                greedy_rows.append(row)
            else:
                chosen[row] = self.model.sample(sequence.sampler, batch_rows[row])
        if greedy_rows:
            for row, token in zip(greedy_rows, logits[greedy_rows].argmax(axis=1).tolist()):
                chosen[row] = token
        for row, sequence in enumerate(outputs):
            self._accept(sequence, chosen[row])

    def _accept(self, sequence: _Sequence, token: int) -> None:
        request = sequence.request
        if request.return_log_probs:
            raw = sequence.log_probs.pop()
            if request.end_id is None or token != request.end_id:
                sequence.log_probs.append(stepwise.log_softmax_at(raw, token))
        if request.end_id is not None and token == request.end_id:
            self._end(sequence)
            return
        sequence.generated.append(token)
        self.generated_tokens += 1
        if sequence.context_ids is not None:
            sequence.context_ids.append(token)
        if sequence.counts is not None:
            sequence.counts[token] += 1
        n = len(sequence.generated)
        if (n >= request.max_new_tokens or len(request.input_ids) + n >= self.context or sequence.cancelled
                or ends_with_stop_word(sequence.generated, request.stop_words)):
            self._end(sequence)
        elif request.streaming and not request.return_generation_logits:
            sequence.box.length = n
            self.relay.wake(sequence.box)

    def _end(self, sequence: _Sequence, error: Exception | None = None) -> None:
        """The sequence is over: its slot and cache are free for the next, then its final response goes out."""
        if sequence.slot >= 0:
            if error is None:   # what its cache holds stays there for a newcomer with the same prefix
                self._cached[sequence.slot] = sequence.cached_tokens()
            else:
                self.model.forget(sequence.slot)
            if sequence.sampler is not None:
                self.model.free_sampler(sequence.sampler)
                sequence.sampler = None
            with self._cond:
                self._running.remove(sequence)
                self._free_slots.append(sequence.slot)
                sequence.slot = -1
        self._finish(sequence, error=error)
