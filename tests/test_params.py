"""Generation parameters: BayLing's defaults, and each bad value named in the error."""

import math

import pytest

from bayling.errors import InvalidInput
from bayling.params import PARAM_NAMES, GenerationParams, validate

NUMERIC = [name for name in PARAM_NAMES if name not in ("stop_words", "bad_words", "logprobs", "logit_bias")]
INTEGER = ["max_tokens", "top_k", "min_length", "beam_width", "random_seed", "end_id", "pad_id"]


def test_defaults_are_bayling_s():
    p = validate({})
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_tokens) == (0.7, 1.0, 0, 1.0, 512)
    assert not p.greedy and validate({"temperature": 0.0}).greedy and validate({"temperature": 9e-6}).greedy


def test_defaults_come_from_the_engine():
    p = validate({"top_p": 0.9}, defaults=GenerationParams(max_tokens=64, temperature=0.1))
    assert (p.max_tokens, p.temperature, p.top_p) == (64, 0.1, 0.9)


@pytest.mark.parametrize("values, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"max_tokens": 10**9}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"random_seed": -1}, "random_seed"),
    ({"end_id": -2}, "end_id"),
    ({"end_id": 1.5}, "end_id"),
    ({"pad_id": -1}, "pad_id"),
    ({"stop_words": [""]}, "stop_words"),
    ({"stop_words": ["x"] * 17}, "stop_words"),
    ({"beam_width": 4}, "beam_width"),
    ({"max_tokens": "12"}, "max_tokens"),
    ({"n": 2}, "n"),
])
def test_bad_values_name_their_field(values, field):
    with pytest.raises(InvalidInput) as info:
        validate(values, max_context=2048)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_max_tokens_limited_by_context():
    assert validate({"max_tokens": 2048}, max_context=2048).max_tokens == 2048
    with pytest.raises(InvalidInput, match="max_tokens: must be between 1 and 2048"):
        validate({"max_tokens": 2049}, max_context=2048)


def test_end_id_minus_one_means_no_end_token_as_in_tensorrt_llm():
    p = validate({"end_id": -1, "pad_id": 0})
    assert (p.end_id, p.pad_id) == (-1, 0)
    assert validate({}).end_id is None  # the engine's own end token


@pytest.mark.parametrize("value", ["4", [4, 5], {"a": 1}, True, math.inf, -math.inf, math.nan], ids=repr)
@pytest.mark.parametrize("name", NUMERIC)
def test_every_numeric_parameter_refuses_wrong_types_naming_itself(name, value):
    with pytest.raises(InvalidInput) as info:
        validate({name: value}, max_context=2048)
    assert info.value.field == name and str(info.value).startswith(f"{name}: ")


@pytest.mark.parametrize("name", INTEGER)
def test_integer_parameters_refuse_fractions(name):
    with pytest.raises(InvalidInput, match=f"^{name}: must be an integer"):
        validate({name: 1.5}, max_context=2048)


def test_integers_beyond_the_int32_tensors_are_refused_by_name():
    for name in ("top_k", "end_id", "pad_id", "min_length"):
        with pytest.raises(InvalidInput, match=f"^{name}: must be between -2147483648 and 2147483647"):
            validate({name: 2**40})
    assert validate({"random_seed": 2**40}).random_seed == 2**40      # a UINT64 tensor


def test_openai_options_logprobs_top_logprobs_and_logit_bias():
    p = validate({"logprobs": True, "top_logprobs": 20, "logit_bias": {"5": -100, 7: 2.5}})
    assert (p.logprobs, p.top_logprobs, p.logit_bias) == (True, 20, {5: -100.0, 7: 2.5})
    for values, message in [({"logprobs": 1}, "^logprobs: must be true or false"),
                            ({"logprobs": True, "top_logprobs": -1}, "^top_logprobs: must be between 0 and 20"),
                            ({"top_logprobs": 1}, "^top_logprobs: can only be used when `logprobs` is True"),
                            ({"logit_bias": [1]}, "^logit_bias: must be an object"),
                            ({"logit_bias": {"-1": 1}}, "^logit_bias: keys must be token ids"),
                            ({"logit_bias": {"1": math.nan}}, "^logit_bias: biases must be numbers"),
                            ({"logit_bias": {str(i): 1 for i in range(1025)}}, "^logit_bias: has 1025 entries")]:
        with pytest.raises(InvalidInput, match=message):
            validate(values)
