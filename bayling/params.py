"""Generation parameters: defaults, limits and validation, shared by the server and the clients.

Names are the public tensor names of the `ensemble` and `bayling` models. Defaults are those of
BayLing's original tools (temperature 0.7, greedy below 1e-5, top_p 1.0, top_k off,
repetition_penalty 1.0, max_new_tokens 512); an engine's manifest may override them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from bayling.errors import InvalidInput

GREEDY_BELOW = 1e-5          # temperature under this means greedy, as in BayLing's inference.py
MAX_STOP_WORDS = 16
MAX_STOP_WORD_CHARS = 256
UINT64_MAX = 2**64 - 1
INT32_MIN, INT32_MAX = -2**31, 2**31 - 1
NO_END_ID = -1               # TensorRT-LLM's end_id for "no end token": generate max_tokens tokens

# Conversation limits, checked before tokenizing (bayling.templates.validate_messages, parse_messages_json).
# No context we serve can use more: a message costs at least ~5 template tokens, so an 8k-token context
# holds under 2,000 messages; 10,000 leaves room for clients that send a long history to be truncated,
# and bounds the work truncation does.
MAX_MESSAGES = 10_000
# 4 MiB of UTF-8: 8x the text that fills a 128k-token context (~4 bytes a token), 100x an 8k one.
# Tokenizing that much takes a few seconds of one core; anything larger can only be refused later.
MAX_MESSAGES_BYTES = 4 * 2**20
MAX_TOP_LOGPROBS = 20        # OpenAI's limits
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_ENTRIES = 1024


@dataclass
class GenerationParams:
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0                      # 0: off
    repetition_penalty: float = 1.0     # 1.0: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_length: int = 0
    length_penalty: float = 1.0
    beam_width: int = 1
    random_seed: int | None = None
    end_id: int | None = None           # None: the model's end token; NO_END_ID: none
    pad_id: int | None = None           # None: the model's pad token
    stop_words: list[str] = field(default_factory=list)
    bad_words: list[str] = field(default_factory=list)
    logprobs: bool = False              # per-token log probabilities of the answer
    top_logprobs: int = 0               # that many most likely alternatives per token (needs logprobs)
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> bias added to its logit

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    def as_dict(self) -> dict:
        return asdict(self)


PARAM_NAMES = tuple(f.name for f in fields(GenerationParams))


def _number(name: str, value, kind: type) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(name, f"must be a number, got {type(value).__name__}")
    if kind is int and (isinstance(value, float) and not value.is_integer()):
        raise InvalidInput(name, f"must be an integer, got {value}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInput(name, f"must be finite, got {value}")
    if kind is int and name != "random_seed" and not INT32_MIN <= value <= INT32_MAX:   # the tensors are INT32
        raise InvalidInput(name, f"must be between {INT32_MIN} and {INT32_MAX}, got {int(value)}")
    return kind(value)


def _words(name: str, value) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(w, str) for w in value):
        raise InvalidInput(name, "must be a list of strings")
    if len(value) > MAX_STOP_WORDS:
        raise InvalidInput(name, f"has {len(value)} entries; at most {MAX_STOP_WORDS} are allowed")
    for w in value:
        if not w:
            raise InvalidInput(name, "has an empty string")
        if len(w) > MAX_STOP_WORD_CHARS:
            raise InvalidInput(name, f"has an entry of {len(w)} characters; at most {MAX_STOP_WORD_CHARS}")
    return list(value)


def _logit_bias(value) -> dict[int, float]:
    """{token id: bias} with ids as integers or decimal strings (JSON keys), biases in [-100, 100]."""
    if not isinstance(value, dict):
        raise InvalidInput("logit_bias", f"must be an object mapping token ids to biases, got {type(value).__name__}")
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidInput("logit_bias", f"has {len(value)} entries; at most {MAX_LOGIT_BIAS_ENTRIES} are allowed")
    out = {}
    for key, bias in value.items():
        text = str(key)
        if isinstance(key, bool) or not (isinstance(key, int) or text.isdigit()) or int(text) < 0:
            raise InvalidInput("logit_bias", f"keys must be token ids, got {key!r}")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias) \
                or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise InvalidInput("logit_bias", f"biases must be numbers between -100 and 100, got {bias!r} for {key}")
        out[int(text)] = float(bias)
    return out


def validate(values: dict, *, defaults: GenerationParams | None = None, max_context: int | None = None) -> GenerationParams:
    """Build GenerationParams from user values (missing ones take `defaults`); InvalidInput names the field."""
    unknown = set(values) - set(PARAM_NAMES)
    if unknown:
        name = sorted(unknown)[0]
        raise InvalidInput(name, f"is not a generation parameter; known: {', '.join(PARAM_NAMES)}")
    p = GenerationParams(**(defaults.as_dict() if defaults else {}))
    for name, value in values.items():
        if value is None:
            continue
        if name in ("stop_words", "bad_words"):
            setattr(p, name, _words(name, value))
        elif name == "logprobs":
            if not isinstance(value, bool):
                raise InvalidInput(name, f"must be true or false, got {type(value).__name__}")
            p.logprobs = value
        elif name == "logit_bias":
            p.logit_bias = _logit_bias(value)
        elif name == "random_seed":
            seed = _number(name, value, int)
            if not 0 <= seed <= UINT64_MAX:
                raise InvalidInput(name, f"must be between 0 and 2**64-1, got {seed}")
            p.random_seed = seed
        elif name in ("end_id", "pad_id"):
            token = _number(name, value, int)
            lowest = NO_END_ID if name == "end_id" else 0
            if token < lowest:
                raise InvalidInput(name, f"must be a token id{f' or {NO_END_ID} (no end token)' if lowest else ''}, got {token}")
            setattr(p, name, token)
        else:
            kind = type(getattr(GenerationParams(), name))
            setattr(p, name, _number(name, value, kind))

    limit = max_context if max_context else 1_000_000
    if not 1 <= p.max_tokens <= limit:
        raise InvalidInput("max_tokens", f"must be between 1 and {limit}, got {p.max_tokens}")
    if not 0 <= p.temperature <= 100:
        raise InvalidInput("temperature", f"must be between 0 and 100, got {p.temperature}")
    if not 0 < p.top_p <= 1:
        raise InvalidInput("top_p", f"must be in (0, 1], got {p.top_p}")
    if p.top_k < 0:
        raise InvalidInput("top_k", f"must be 0 (off) or positive, got {p.top_k}")
    if not 0 < p.repetition_penalty <= 10:
        raise InvalidInput("repetition_penalty", f"must be in (0, 10], got {p.repetition_penalty}")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= getattr(p, name) <= 2:
            raise InvalidInput(name, f"must be between -2 and 2, got {getattr(p, name)}")
    if not 0 <= p.min_length <= p.max_tokens:
        raise InvalidInput("min_length", f"must be between 0 and max_tokens ({p.max_tokens}), got {p.min_length}")
    if not 0 <= p.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidInput("top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}, got {p.top_logprobs}")
    if p.top_logprobs and not p.logprobs:
        raise InvalidInput("top_logprobs", "can only be used when `logprobs` is True")
    if p.beam_width != 1:
        raise InvalidInput("beam_width", f"only 1 (no beam search) is served, got {p.beam_width}")
    if p.length_penalty != 1.0:
        raise InvalidInput("length_penalty", "applies to beam search only, which is not served; leave it at 1.0")
    return p
