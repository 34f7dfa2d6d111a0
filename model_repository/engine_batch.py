"""One `tensorrt_llm` call, as TensorRT-LLM's backend treats it: a batch of requests, each with
`num_return_sequences`, answered decoupled (a response per piece, `batch_index` / `sequence_index`
saying whose) or unary (one response holding the whole batch, as NVIDIA's non-decoupled deployment).

The CPU engine runs each (request, sequence) as its own `EngineRequest`; sequences of one request
sample independently (greedy ones are equal, as on TensorRT-LLM). `Group` gathers their emissions
into the call's responses; it is called from the engine's one relay thread, so it needs no lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from bayling import contract
from bayling.errors import InvalidInput
from bayling.model_repository.engine_ct2 import Emission
from bayling.model_repository.engine_io import engine_outputs
from bayling.model_repository.triton_io import scalar

# Read by TensorRT-LLM for encoder-decoder models only; NVIDIA's preprocessing always sends them, and
# a decoder-only engine ignores them (as TensorRT-LLM does).
IGNORED_FOR_DECODER_ONLY = ("decoder_input_ids", "decoder_input_lengths")
MAX_RETURN_SEQUENCES = 16


def refuse_unsupported(inputs: dict[str, np.ndarray]) -> None:
    """INVALID_ARGUMENT naming the first input the CPU engine cannot honour (flags only when true)."""
    for name, what in contract.CPU_UNSUPPORTED.items():
        value = inputs.get(name)
        if value is None or value.size == 0:
            continue
        if value.dtype == np.bool_ and not value.any():
            continue
        raise InvalidInput(name, f"{what} are not available from the CPU engine (the TensorRT-LLM engine takes it)")


def batch_size(inputs: dict[str, np.ndarray]) -> int:
    sizes = {name: value.shape[0] for name, value in inputs.items() if value.ndim}
    size = sizes.get("input_lengths") or sizes.get("input_ids") or 1
    for name, n in sizes.items():
        if n != size:
            raise InvalidInput(name, f"has {n} rows for a batch of {size} requests")
    return size


def split(inputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The call's inputs, one dict per request of the batch (each keeps a batch dimension of 1)."""
    size = batch_size(inputs)
    if size == 1:
        return [inputs]
    return [{name: value[i:i + 1] if value.ndim else value for name, value in inputs.items()} for i in range(size)]


def return_sequences(item: dict[str, np.ndarray]) -> int:
    n = int(scalar(item, "num_return_sequences", 1) or 1)
    if not 1 <= n <= MAX_RETURN_SEQUENCES:
        raise InvalidInput("num_return_sequences", f"must be between 1 and {MAX_RETURN_SEQUENCES}, got {n}")
    if n > 1 and int(scalar(item, "beam_width", 1) or 1) > 1:
        raise InvalidInput("num_return_sequences", "give num_return_sequences or beam_width above 1, not both")
    return n


def sequence_seed(seed: int | None, sequence_index: int) -> int | None:
    """Each returned sequence samples on its own: a seeded request's sequences get seed, seed + 1, ...
    (64-bit, wrapping), so they differ from each other and repeat from call to call."""
    return None if seed is None else (int(seed) + sequence_index) % (1 << 64)


Send = Callable[[dict[str, np.ndarray] | Exception | None, bool], None]   # (outputs or error; final)


@dataclass
class _Member:
    batch_index: int
    sequence_index: int
    prefix_ids: list[int]
    ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    cum_log_prob: float = 0.0     # over every response so far: TensorRT-LLM's cum_log_probs when streaming
    beams: list | None = None     # beam search: (ids, log probs) per beam, best first
    done: bool = False


class Group:
    """The responses of one call. Decoupled: each emission leaves at once, tagged with its
    batch and sequence index; the call's last response carries the final flag. Unary: one
    response when every member has finished, output_ids [batch, sequences, tokens] padded
    with `pad_id`, as TensorRT-LLM's non-decoupled answer."""

    def __init__(self, send: Send, decoupled: bool, requested: frozenset[str] | None, pad_id: int = 0):
        self.send, self.decoupled, self.requested, self.pad_id = send, decoupled, requested, pad_id
        self.members: list[_Member] = []
        self.error: Exception | None = None
        self._open = 0

    def add(self, batch_index: int, sequence_index: int, prefix_ids: list[int]) -> Callable[[Emission], None]:
        member = _Member(batch_index, sequence_index, list(prefix_ids))
        self.members.append(member)
        self._open += 1
        return lambda emission: self._emit(member, emission)

    def _emit(self, member: _Member, emission: Emission) -> None:
        if emission.final:
            member.done = True
            self._open -= 1
        last = self._open == 0
        if emission.error is not None and self.error is None:
            self.error = emission.error
            if self.decoupled:
                self.send(emission.error, last)
                return
        if self.decoupled:
            if self.error is not None and not last:
                return
            outputs = engine_outputs(emission, member.prefix_ids, self.requested)
            member.prefix_ids = []     # the input ids lead only the first response
            if "cum_log_probs" in outputs and not emission.beams:
                member.cum_log_prob += sum(emission.log_probs)
                outputs["cum_log_probs"] = np.array([[member.cum_log_prob]], dtype=np.float32)
            self._indices(outputs, [member])
            self.send(None if self.error is not None else outputs, last)
            return
        member.ids.extend(emission.token_ids)
        member.log_probs.extend(emission.log_probs)
        if emission.beams:
            member.beams = emission.beams
        if last:
            self.send(self.error if self.error is not None else self._unary(), True)

    def _wanted(self, name: str) -> bool:
        return self.requested is None or name in self.requested

    def _indices(self, outputs: dict[str, np.ndarray], members: list[_Member]) -> None:
        if self._wanted("batch_index"):
            outputs["batch_index"] = np.array([[m.batch_index] for m in members], dtype=np.int32)
        if self._wanted("sequence_index"):
            outputs["sequence_index"] = np.array([[m.sequence_index] for m in members], dtype=np.int32)

    def _unary(self) -> dict[str, np.ndarray]:
        batch = max(m.batch_index for m in self.members) + 1
        # a row per sequence, or per beam of a beam search
        # output_log_probs cover the generated tokens only, as TensorRT-LLM's (also when the input is returned)
        rows = {}
        for m in self.members:
            for beam, (ids, probs) in enumerate(m.beams or [(m.ids, m.log_probs)]):
                rows[(m.batch_index, m.sequence_index + beam)] = (m.prefix_ids + list(ids), list(probs))
        width = max(s for _, s in rows) + 1
        longest = max(len(ids) for ids, _ in rows.values())
        generated = max(len(probs) for _, probs in rows.values())
        output_ids = np.full((batch, width, longest), self.pad_id, dtype=np.int32)
        lengths = np.zeros((batch, width), dtype=np.int32)
        log_probs = np.zeros((batch, width, generated), dtype=np.float32)
        for (b, s), (ids, probs) in rows.items():
            output_ids[b, s, :len(ids)] = ids
            lengths[b, s] = len(ids)
            log_probs[b, s, :len(probs)] = probs
        outputs = {"output_ids": output_ids, "sequence_length": lengths,
                   "cum_log_probs": log_probs.sum(axis=2), "output_log_probs": log_probs}
        firsts = [m for m in self.members if m.sequence_index == 0]
        self._indices(outputs, sorted(firsts, key=lambda m: m.batch_index))
        return {k: v for k, v in outputs.items() if self._wanted(k)}
