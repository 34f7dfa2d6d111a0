"""Chat templates: BayLing's two prompt formats, plus "the tokenizer's own template".

The templates are Jinja files in ``chat_templates/``, written once and used two ways:
this module renders them, and the engine build stores them in the tokenizer's
``chat_template`` so that Hugging Face's ``apply_chat_template`` gives the same
prompt. Rendering uses the same sandboxed Jinja settings as ``transformers``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from bayling.errors import InvalidInput
from bayling.params import MAX_MESSAGES, MAX_MESSAGES_BYTES

ROLES = ("system", "user", "assistant")
BUILTIN = ("bayling", "bayling-3")
TEMPLATE_CHOICES = ("auto", "bayling", "bayling-3", "hf")


@dataclass(frozen=True)
class ChatTemplate:
    name: str                          # "bayling", "bayling-3" or "hf"
    source: str                        # Jinja text
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # besides the tokenizer's EOS
    placeholders: bool = False         # BayLing's model-card placeholders in the output


def builtin_template(name: str) -> ChatTemplate:
    if name not in BUILTIN:
        raise ValueError(f"no built-in template {name!r}; choose from {BUILTIN}")
    source = resources.files("bayling").joinpath("chat_templates", f"{name}.jinja").read_text(encoding="utf-8")
    if name == "bayling-3":
        # ictnlp/BayLing conversation.py: stop_str "<|eot_id|>", stop_token_ids [2, 128001, 128009]
        return ChatTemplate(name, source, ("<|eot_id|>",), (2, 128001, 128009), placeholders=True)
    return ChatTemplate(name, source, (), (), placeholders=True)


def tokenizer_template(source: str) -> ChatTemplate:
    """The tokenizer's own chat template (for models that are not BayLing)."""
    if not source:
        raise ValueError("the tokenizer has no chat_template; choose --template bayling or bayling-3")
    return ChatTemplate("hf", source, (), (), placeholders=False)


def parse_messages_json(raw: bytes | str) -> list[dict]:
    """Decode the `messages` input: a UTF-8 JSON list of {role, content}; too large is refused undecoded."""
    if len(raw) > MAX_MESSAGES_BYTES:   # a str's characters: never more than its bytes
        raise InvalidInput("messages", f"is {len(raw)} {'bytes' if isinstance(raw, bytes) else 'characters'} of JSON; "
                                       f"at most {MAX_MESSAGES_BYTES} bytes are accepted")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput("messages", f"is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        messages = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInput("messages", f"is not valid JSON: {exc.msg} at position {exc.pos}") from None
    except ValueError as exc:           # an integer of more than 4,300 digits
        raise InvalidInput("messages", f"is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidInput("messages", "is nested too deeply to be a list of {role, content} objects") from None
    return validate_messages(messages)


def shown(value: object) -> str:
    """A user's value in an error message, short and never recursing into it."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else repr(value[:40]) + "..."
    if value is None or isinstance(value, (bool, float)) or isinstance(value, int) and value.bit_length() <= 128:
        return repr(value)
    return f"of type {type(value).__name__}"


def validate_messages(messages: object) -> list[dict]:
    """Check a conversation: optional system first, then user/assistant alternating, ending with user;
    at most MAX_MESSAGES messages and MAX_MESSAGES_BYTES of content."""
    if not isinstance(messages, list) or not messages:
        raise InvalidInput("messages", "must be a non-empty JSON list of {role, content} objects")
    if len(messages) > MAX_MESSAGES:
        raise InvalidInput("messages", f"has {len(messages)} items; at most {MAX_MESSAGES} are accepted "
                                       "(drop the oldest turns)")
    clean: list[dict] = []
    size = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidInput("messages", f"item {i} is not an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InvalidInput("messages", f"item {i} has unknown role {shown(role)}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InvalidInput("messages", f"item {i} ({role}) needs a string content")
        if not content.strip():
            raise InvalidInput("messages", f"item {i} ({role}) has empty content")
        if role == "system" and i != 0:
            raise InvalidInput("messages", f"item {i}: a system message may only come first")
        try:
            size += len(content.encode("utf-8"))
        except UnicodeEncodeError as exc:   # JSON's "\ud800": no tokenizer takes it
            raise InvalidInput("messages", f"item {i} ({role}) has a lone surrogate at character {exc.start}, "
                                           "which is not text") from None
        if size > MAX_MESSAGES_BYTES:
            raise InvalidInput("messages", f"has more than {MAX_MESSAGES_BYTES} bytes of content (UTF-8), "
                                           f"passed at item {i}")
        clean.append({"role": role, "content": content})
    turns = clean[1:] if clean[0]["role"] == "system" else clean
    if not turns:
        raise InvalidInput("messages", "has a system message but no user turn")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            offset = len(clean) - len(turns)
            raise InvalidInput("messages", f"item {i + offset} is {message['role']!r} but {expected!r} was expected "
                                           "(turns alternate user, assistant, ... after an optional system message)")
    if turns[-1]["role"] != "user":
        raise InvalidInput("messages", "must end with a user turn")
    return clean


@lru_cache(maxsize=8)
def _compiled(source: str):
    # The same environment transformers uses for apply_chat_template.
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def render_prompt(messages: list[dict], template: ChatTemplate, *, bos_token: str = "", eos_token: str = "",
                  add_generation_prompt: bool = True) -> str:
    """Render a validated conversation to the prompt text (BOS is added by the tokenizer, not here)."""
    from jinja2.exceptions import TemplateError

    try:
        return _compiled(template.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 bos_token=bos_token, eos_token=eos_token)
    except TemplateError as exc:
        raise InvalidInput("messages", f"the {template.name} chat template refused it: {exc}") from None
