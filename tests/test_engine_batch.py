"""One tensorrt_llm call as TensorRT-LLM's backend answers it: a batch split into requests, each
emission tagged with its batch and sequence index (decoupled), or one padded response (unary)."""

import numpy as np
import pytest

from bayling.errors import InvalidInput
from bayling.model_repository import engine_batch
from bayling.model_repository.engine_ct2 import Emission


def collect():
    sent = []
    return sent, lambda outputs, final: sent.append((outputs, final))


def test_a_batched_call_splits_into_one_request_per_row():
    inputs = {"input_ids": np.array([[1, 2, 3], [4, 5, 0]], np.int32), "input_lengths": np.array([3, 2], np.int32),
              "request_output_len": np.array([8, 8], np.int32)}
    rows = engine_batch.split(inputs)
    assert len(rows) == 2 and rows[1]["input_ids"].tolist() == [[4, 5, 0]] and rows[1]["input_lengths"].tolist() == [2]
    with pytest.raises(InvalidInput, match="request_output_len: has 1 rows for a batch of 2"):
        engine_batch.split({**inputs, "request_output_len": np.array([8], np.int32)})


def test_inputs_the_cpu_engine_cannot_honour_are_refused_by_name():
    engine_batch.refuse_unsupported({"return_context_logits": np.array([False]), "lora_weights": np.zeros((1, 0))})
    with pytest.raises(InvalidInput, match="^lora_task_id: LoRA"):
        engine_batch.refuse_unsupported({"lora_task_id": np.array([3], np.uint64)})
    with pytest.raises(InvalidInput, match="^num_return_sequences:"):
        engine_batch.return_sequences({"num_return_sequences": np.array([2]), "beam_width": np.array([2])})


def test_decoupled_each_emission_leaves_tagged_and_only_the_last_is_final():
    sent, send = collect()
    group = engine_batch.Group(send, decoupled=True, requested=None)
    first, second = group.add(0, 0, []), group.add(1, 0, [])
    first(Emission([5], [-0.5], False))
    second(Emission([7, 8], [-1.0, -2.0], True))
    first(Emission([6], [-0.25], True))
    assert [final for _, final in sent] == [False, False, True]
    assert [int(o["batch_index"][0][0]) for o, _ in sent] == [0, 1, 0]
    assert sent[2][0]["cum_log_probs"].item() == pytest.approx(-0.75), "streamed cum_log_probs run on"


def test_unary_one_response_holds_the_batch_padded_with_the_pad_id():
    sent, send = collect()
    group = engine_batch.Group(send, decoupled=False, requested=None, pad_id=9)
    first, second = group.add(0, 0, [1, 2]), group.add(1, 0, [])
    first(Emission([5], [-0.5], True))
    assert sent == []
    second(Emission([7, 8, 3], [-1.0, -2.0, -0.5], True))
    ((outputs, final),) = sent
    assert final
    assert outputs["output_ids"].tolist() == [[[1, 2, 5]], [[7, 8, 3]]]
    assert outputs["sequence_length"].tolist() == [[3], [3]]
    assert outputs["output_log_probs"].tolist() == [[[-0.5, 0, 0]], [[-1.0, -2.0, -0.5]]]   # generated tokens only
    assert outputs["cum_log_probs"].tolist() == [[-0.5], [-3.5]]


def test_an_error_in_one_member_is_the_call_s_answer():
    sent, send = collect()
    group = engine_batch.Group(send, decoupled=False, requested=None)
    first, second = group.add(0, 0, []), group.add(0, 1, [])
    first(Emission([], [], True, InvalidInput("input_ids", "bad")))
    second(Emission([4], [-1.0], True))
    ((error, final),) = sent
    assert isinstance(error, InvalidInput) and final


def test_sequences_of_a_seeded_call_get_seeds_of_their_own():
    assert [engine_batch.sequence_seed(7, s) for s in range(3)] == [7, 8, 9]
    assert engine_batch.sequence_seed(2**64 - 1, 1) == 0 and engine_batch.sequence_seed(None, 2) is None
