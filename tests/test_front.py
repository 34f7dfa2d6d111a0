"""The HTTP front's checks, without a server (the e2e tests send the same bodies through it)."""

import json

import pytest

from bayling.errors import InvalidInput
from bayling.model_repository.front import check_generate_body
from bayling.model_repository.server import Launcher, TritonServer


@pytest.mark.parametrize("body", [
    {"text_input": "hi", "max_tokens": 8, "temperature": 0.5, "stream": True, "random_seed": 2**64 - 1},
    {"text_input": "hi", "stop_words": ["a", "b"], "bad_words": "c"},
    {"messages": "[]", "some_parameter": [1, {"x": 2}]},           # unknown keys are Triton's parameters
])
def test_well_typed_bodies_pass(body):
    check_generate_body("bayling", json.dumps(body).encode())


@pytest.mark.parametrize("body, message", [
    ({"max_tokens": True}, "max_tokens: must be a number, got bool"),
    ({"max_tokens": 2**31}, "max_tokens: must be between"),
    ({"random_seed": 2**64}, "random_seed: must be between 0 and 18446744073709551615"),
    ({"top_p": "0.5"}, "top_p: must be a number, got str"),
    ({"top_p": 1e39}, "top_p: must be a finite 32-bit float"),
    ({"text_input": ["a", "b"]}, "text_input: must be one value, not a list"),
    ({"stop_words": ["a", 3]}, "stop_words: must be a string, got int"),
])
def test_mistyped_values_name_the_field(body, message):
    with pytest.raises(InvalidInput, match="^" + message.replace("(", r"\(")):
        check_generate_body("bayling", json.dumps(body).encode())


def test_token_ids_for_the_engine_model_are_a_list_of_integers():
    check_generate_body("tensorrt_llm", b'{"input_ids": [1, 2, 3], "input_lengths": 3, "request_output_len": 4}')
    with pytest.raises(InvalidInput, match="^input_ids: must be an integer"):
        check_generate_body("tensorrt_llm", b'{"input_ids": [1, 2.5]}')


def test_triton_s_own_http_port_listens_on_loopback_only(tmp_path):
    server = TritonServer(tmp_path, Launcher(tmp_path / "tritonserver", None, {}), 8000, 8001, 8002, "0.0.0.0",
                          triton_http_port=45678)
    command = server.command()
    assert "--http-address=127.0.0.1" in command and "--http-port=45678" in command
    assert "--grpc-address=0.0.0.0" in command and "--metrics-address=0.0.0.0" in command
