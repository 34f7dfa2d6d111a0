"""End to end: NVIDIA's inflight_batcher_llm interface on the real server, with tritonclient and
NVIDIA's tensor names, shaped as NVIDIA's own clients shape them (inflight_batcher_llm/client/
end_to_end_grpc_client.py, tools/inflight_batcher_llm/end_to_end_test.py of tensorrtllm_backend
v0.17.0): text_output one value per beam, several prompts in one call, num_return_sequences, log
probs through the ensemble, the non-decoupled deployment over unary gRPC and HTTP, and
tensorrt_llm_bls streaming exact text.
"""

from __future__ import annotations

import queue
import re

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from bayling.client.library import stream_error
from bayling.model_repository.render import RenderOptions
from tests.conftest import Endpoints

pytestmark = [pytest.mark.e2e, pytest.mark.cpu_engine]

PROMPTS = ["The capital of France is", "One, two, three,", "Hello"]
CHINESE = "把这句话翻译成英文：今天天气很好。"


def tensors(module, values: dict[str, np.ndarray]) -> list:
    out = []
    for name, array in values.items():
        t = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        t.set_data_from_numpy(array)
        out.append(t)
    return out


def text_request(prompts: list[str], max_tokens: int = 8, **extra) -> dict[str, np.ndarray]:
    """As NVIDIA's clients build one: [batch, 1] for every value."""
    n = len(prompts)
    values = {"text_input": np.array([[p.encode()] for p in prompts], dtype=object),
              "max_tokens": np.full((n, 1), max_tokens, dtype=np.int32)}
    for name, value in extra.items():
        dtype = {bool: np.bool_, int: np.int32, float: np.float32}[type(value)]
        values[name] = np.full((n, 1), value, dtype=dtype)
    return values


def stream(url: str, model: str, values: dict, outputs: list[str] = ("text_output",)) -> list[dict]:
    """One request over a gRPC stream; every response's outputs, up to the final one."""
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    got = []
    try:
        client.async_stream_infer(model, tensors(grpcclient, values), enable_empty_final_response=True,
                                  outputs=[grpcclient.InferRequestedOutput(o) for o in outputs])
        while True:
            result, error = responses.get(timeout=120)
            if error is not None:
                raise error
            named = {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}
            if named:
                got.append(named)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return got
    finally:
        client.stop_stream()
        client.close()


def grpc_infer(url: str, model: str, values: dict, outputs: list[str] | None = None):
    with grpcclient.InferenceServerClient(url) as client:
        requested = [grpcclient.InferRequestedOutput(o) for o in outputs] if outputs else None
        return client.infer(model, tensors(grpcclient, values), outputs=requested)


def http_infer(url: str, model: str, values: dict, outputs: list[str] | None = None):
    with httpclient.InferenceServerClient(url) as client:
        requested = [httpclient.InferRequestedOutput(o) for o in outputs] if outputs else None
        return client.infer(model, tensors(httpclient, values), outputs=requested)


def own_message(error: InferenceServerException) -> str:
    """The model's message, without the "in ensemble 'ensemble', " that Triton puts before a step's error."""
    return re.sub(r"^in ensemble '\w+', ", "", error.message())


def texts(array: np.ndarray) -> list[str]:
    return [v.decode("utf-8") for v in array.reshape(-1)]


@pytest.fixture(scope="module")
def unary_server(default_engine, tmp_path_factory):
    """`bayling serve --decoupled false`: tensorrt_llm and tensorrt_llm_bls answer with one response."""
    from bayling.model_repository.serve import ServeOptions, start_server

    run = tmp_path_factory.mktemp("server-unary")
    server = start_server(ServeOptions(default_engine, 0, 0, 0, run_dir=run, log_file=run / "tritonserver.log",
                                       ready_timeout=300, render=RenderOptions(decoupled=False)))
    yield Endpoints(server.grpc_url, server.http_url, default_engine, server.log_file, server.metrics_url)
    server.stop()


# --- the decoupled deployment (the default)

def test_text_output_is_one_value_per_beam_so_output_0_decodes(default_server):
    responses = stream(default_server.grpc, "ensemble", text_request(PROMPTS[:1], top_k=1))
    (only,) = responses
    assert only["text_output"].shape == (1,)
    assert only["text_output"][0].decode().strip()          # what end_to_end_grpc_client.py does


def test_several_prompts_in_one_call_answer_each_as_alone(default_server):
    alone = [texts(stream(default_server.grpc, "ensemble", text_request([p], top_k=1))[0]["text_output"])[0]
             for p in PROMPTS]
    responses = stream(default_server.grpc, "ensemble", text_request(PROMPTS, top_k=1),
                       outputs=["text_output", "batch_index"])
    assert len(responses) == len(PROMPTS)
    by_index = {int(r["batch_index"][0][0]): texts(r["text_output"]) for r in responses}
    assert sorted(by_index) == [0, 1, 2]
    assert [by_index[i] for i in range(3)] == [[t] for t in alone]


def test_several_prompts_stream_their_pieces_tagged_by_batch_index(default_server):
    responses = stream(default_server.grpc, "ensemble", text_request(PROMPTS, top_k=1, stream=True),
                       outputs=["text_output", "batch_index"])
    pieces: dict[int, list[str]] = {}
    for r in responses:
        pieces.setdefault(int(r["batch_index"][0][0]), []).extend(texts(r["text_output"]))
    assert sorted(pieces) == [0, 1, 2]
    assert all(len(p) >= 2 for p in pieces.values()), "streamed in pieces"


def test_num_return_sequences_sample_each_sequence_on_its_own(default_server):
    values = text_request(PROMPTS[:1], 12, num_return_sequences=3, top_k=50, temperature=1.5)
    values["random_seed"] = np.array([[7]], dtype=np.uint64)
    first = stream(default_server.grpc, "ensemble", values, outputs=["text_output", "sequence_index"])
    again = stream(default_server.grpc, "ensemble", values, outputs=["text_output", "sequence_index"])

    def by_sequence(responses):
        return {int(r["sequence_index"][0][0]): texts(r["text_output"])[0] for r in responses}

    assert sorted(by_sequence(first)) == [0, 1, 2]
    assert len(set(by_sequence(first).values())) > 1, "the sequences were sampled alike"
    assert by_sequence(first) == by_sequence(again), "a seeded call repeats"


def test_log_probs_pass_through_the_ensemble_and_are_the_model_s(default_server, default_engine, smol_tokenizer):
    from tests.engine_reference import greedy_reference

    outputs = ["text_output", "output_log_probs", "cum_log_probs"]
    (response,) = stream(default_server.grpc, "ensemble", text_request(PROMPTS[:1], 8, top_k=1, return_log_probs=True),
                         outputs=outputs)
    per_token, cum = response["output_log_probs"], response["cum_log_probs"]
    assert per_token.shape == (1, 1, 8) and cum.shape == (1, 1)      # [batch, beam, tokens], [batch, beam]
    assert np.all(per_token <= 0) and np.isclose(cum.sum(), per_token.sum(), atol=1e-4)
    # the log-softmax of the model's logits at each greedy step, as llama.cpp computes them in-process
    answer, steps = greedy_reference(default_engine, smol_tokenizer.encode(PROMPTS[0]), 8)
    assert np.allclose(per_token.reshape(-1), steps, atol=1e-3)
    assert texts(response["text_output"]) == [smol_tokenizer.decode(answer)]


@pytest.mark.parametrize("model, values, name", [
    ("ensemble", {"lora_task_id": np.array([[3]], dtype=np.uint64)}, "lora_task_id"),
    ("ensemble", {"decoder_text_input": np.array([[b"x"]], dtype=object)}, "decoder_text_input"),
    ("tensorrt_llm_bls", {"image_url_input": np.array([[b"http://x"]], dtype=object)}, "image_url_input"),
    ("tensorrt_llm_bls", {"num_return_sequences": np.array([[2]], dtype=np.int32)}, "num_return_sequences"),
])
def test_what_a_text_model_on_cpu_cannot_do_is_invalid_argument_naming_it(default_server, model, values, name):
    with pytest.raises(InferenceServerException) as failure:
        stream(default_server.grpc, model, {**text_request(PROMPTS[:1]), **values})
    assert stream_error(failure.value.status(), own_message(failure.value)).status == "INVALID_ARGUMENT"
    assert own_message(failure.value).startswith(f"{name}:"), failure.value.message()
    assert stream(default_server.grpc, model, text_request(PROMPTS[:1], top_k=1))     # still serving


def test_the_engine_refuses_speculative_decoding_by_name(default_server, smol_tokenizer):
    ids = np.array([smol_tokenizer.encode(PROMPTS[0])], dtype=np.int32)
    values = {"input_ids": ids, "input_lengths": np.array([[ids.shape[1]]], dtype=np.int32),
              "request_output_len": np.array([[4]], dtype=np.int32),
              "draft_input_ids": np.array([[5, 6]], dtype=np.int32)}
    with pytest.raises(InferenceServerException) as failure:
        stream(default_server.grpc, "tensorrt_llm", values, outputs=["output_ids"])
    assert stream_error(failure.value.status(), own_message(failure.value)).status == "INVALID_ARGUMENT"
    assert failure.value.message().startswith("draft_input_ids:")


def test_tensorrt_llm_bls_streams_exact_text(default_server):
    whole = stream(default_server.grpc, "tensorrt_llm_bls", text_request([CHINESE], 24, top_k=1))
    pieces = stream(default_server.grpc, "tensorrt_llm_bls", text_request([CHINESE], 24, top_k=1, stream=True))
    assert len(whole) == 1 and whole[0]["text_output"].shape == (1,)
    streamed = [t for r in pieces for t in texts(r["text_output"])]
    assert len(streamed) > 2
    assert "".join(streamed) == texts(whole[0]["text_output"])[0]
    # no character split inside the stream (an answer cut by max_tokens may end in half of one)
    assert "\ufffd" not in "".join(streamed).rstrip("\ufffd") and any("\u4e00" <= ch <= "\u9fff" for ch in "".join(streamed))


# --- the non-decoupled deployment (bayling serve --decoupled false)

def test_unary_clients_call_each_model_in_turn_as_end_to_end_test_does(unary_server):
    """preprocessing -> tensorrt_llm -> postprocessing by hand equals the ensemble and tensorrt_llm_bls."""
    for infer, url in ((grpc_infer, unary_server.grpc), (http_infer, unary_server.http)):
        query = {"QUERY": np.array([[PROMPTS[0].encode()]], dtype=object),
                 "REQUEST_OUTPUT_LEN": np.array([[8]], dtype=np.int32),
                 "BAD_WORDS_DICT": np.array([[b""]], dtype=object), "STOP_WORDS_DICT": np.array([[b""]], dtype=object)}
        pre = infer(url, "preprocessing", query)
        engine_in = {"input_ids": pre.as_numpy("INPUT_ID"), "decoder_input_ids": pre.as_numpy("DECODER_INPUT_ID"),
                     "input_lengths": pre.as_numpy("REQUEST_INPUT_LEN"),
                     "request_output_len": pre.as_numpy("REQUEST_OUTPUT_LEN"),
                     "end_id": pre.as_numpy("OUT_END_ID"), "pad_id": pre.as_numpy("OUT_PAD_ID"),
                     "return_log_probs": np.array([[True]])}
        engine = infer(url, "tensorrt_llm", engine_in)
        ids, lengths = engine.as_numpy("output_ids"), engine.as_numpy("sequence_length")
        assert ids.shape[:2] == (1, 1) and lengths.shape == (1, 1)
        assert engine.as_numpy("output_log_probs").shape == (1, 1, int(lengths[0, 0]))
        post = infer(url, "postprocessing", {"TOKENS_BATCH": ids, "SEQUENCE_LENGTH": lengths})
        by_hand = post.as_numpy("OUTPUT")
        request = {**text_request(PROMPTS[:1]), "bad_words": query["BAD_WORDS_DICT"],
                   "stop_words": query["STOP_WORDS_DICT"], "return_log_probs": np.array([[True]])}
        ensemble = infer(url, "ensemble", request, ["text_output", "cum_log_probs", "output_log_probs"])
        assert list(ensemble.as_numpy("text_output")) == list(by_hand) and by_hand.shape == (1,)
        assert np.array_equal(ensemble.as_numpy("output_log_probs"), engine.as_numpy("output_log_probs"))
        bls = infer(url, "tensorrt_llm_bls", text_request(PROMPTS[:1]))
        assert list(bls.as_numpy("text_output")) == list(by_hand)


def test_unary_batch_answers_every_prompt_in_one_response(unary_server):
    result = grpc_infer(unary_server.grpc, "ensemble", text_request(PROMPTS, top_k=1), ["text_output"])
    assert result.as_numpy("text_output").shape == (3,)
    alone = [texts(grpc_infer(unary_server.grpc, "ensemble", text_request([p], top_k=1)).as_numpy("text_output"))[0]
             for p in PROMPTS]
    assert texts(result.as_numpy("text_output")) == alone


def test_unary_deployment_refuses_streaming_by_name_and_keeps_serving(unary_server):
    with pytest.raises(InferenceServerException) as failure:
        grpc_infer(unary_server.grpc, "ensemble", text_request(PROMPTS[:1], stream=True))
    assert own_message(failure.value).startswith("streaming:")
    with pytest.raises(InferenceServerException) as failure:
        grpc_infer(unary_server.grpc, "tensorrt_llm_bls", text_request(PROMPTS[:1], stream=True))
    assert failure.value.message().startswith("stream:")
    assert grpc_infer(unary_server.grpc, "ensemble", text_request(PROMPTS[:1])).as_numpy("text_output").size == 1


def test_the_bayling_model_answers_on_the_unary_deployment(unary_server):
    from tests.triton_helpers import chat, grpc_stream

    result = grpc_stream(unary_server.grpc, chat("Say hi.", max_tokens=8, temperature=0.0, stream=True))
    assert result.error is None and result.text.strip()


def test_streamed_log_probs_join_to_the_whole_ones_and_cum_log_probs_runs_on(default_server):
    outputs = ["output_log_probs", "cum_log_probs"]
    whole = stream(default_server.grpc, "ensemble", text_request(PROMPTS[:1], 8, top_k=1, return_log_probs=True),
                   outputs=outputs)[0]
    pieces = stream(default_server.grpc, "ensemble",
                    text_request(PROMPTS[:1], 8, top_k=1, return_log_probs=True, stream=True), outputs=outputs)
    joined = np.concatenate([p["output_log_probs"].reshape(-1) for p in pieces])
    assert np.allclose(joined, whole["output_log_probs"].reshape(-1), atol=1e-5)
    running = np.cumsum([p["output_log_probs"].sum() for p in pieces])
    assert np.allclose([p["cum_log_probs"].item() for p in pieces], running, atol=1e-4)


def test_beam_search_is_refused_by_name_on_the_llama_cpp_engine(default_server):
    with pytest.raises(InferenceServerException) as failure:
        stream(default_server.grpc, "ensemble", text_request(PROMPTS[:1], 8, beam_width=3))
    assert own_message(failure.value).startswith("beam_width:") and "cpu-ct2" in own_message(failure.value)
    assert texts(stream(default_server.grpc, "ensemble", text_request(PROMPTS[:1], 4, top_k=1))[0]["text_output"])


def test_beam_search_answers_every_beam_best_first(ct2_server):
    """On the CTranslate2 engine (bayling build --target cpu-ct2), which does beam search."""
    default_server = ct2_server
    outputs = ["text_output", "output_log_probs", "cum_log_probs"]
    (response,) = stream(default_server.grpc, "ensemble", text_request(PROMPTS[:1], 8, beam_width=3,
                                                                        return_log_probs=True), outputs=outputs)
    beams = texts(response["text_output"])
    assert response["text_output"].shape == (3,) and len(set(beams)) == 3
    assert response["output_log_probs"].shape == (1, 3, 8)
    cum = response["cum_log_probs"].reshape(-1)
    assert np.allclose(cum, response["output_log_probs"].sum(axis=2).reshape(-1), atol=1e-4)
    assert list(cum) == sorted(cum, reverse=True), "best beam first"
    with pytest.raises(InferenceServerException) as failure:
        stream(default_server.grpc, "ensemble", text_request(PROMPTS[:1], 8, beam_width=3, stream=True))
    assert own_message(failure.value).startswith("streaming:")
