"""The llama.cpp CPU engine (continuous batching over a GGUF Q8_0 model) on real llama.cpp: the same
contract as the CTranslate2 engine (per-request limits, stop words, end id, cancellation, `stop`,
seeds), and what a serving engine's scheduler must do: a newcomer is answered while others generate,
a finished sequence frees its slot at once, requests with penalties or min_length run beside others.
The scripted tiny model's greedy output is known exactly (tests/models.py)."""


import numpy as np
import pytest

from bayling.build_engine.gguf_build import GGUF_NAME
from bayling.errors import InvalidInput
from bayling.manifest import ENGINE_SUBDIRS
from bayling.model_repository.engine_ct2 import EngineRequest
from bayling.model_repository.engine_llamacpp import LlamaCppEngine, LlamaModel, shared_prefix
from tests.client_helpers import Collector
from tests.engine_checks import check_concurrent_requests_stay_separate, greedy, stream_behind_a_slow_first_send


def gguf(engine_dir) -> str:
    return str(engine_dir / ENGINE_SUBDIRS["llamacpp"] / GGUF_NAME)


@pytest.fixture(scope="module")
def engine(scripted_engine):
    e = LlamaCppEngine(gguf(scripted_engine), context=256, max_batch_size=8, threads=1)
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def smol(default_engine):
    e = LlamaCppEngine(gguf(default_engine), context=512, max_batch_size=4)
    yield e
    e.shutdown()


def chat_ids(tokenizer, text, system=""):
    messages = [{"role": "system", "content": system}] if system else []
    return tokenizer.apply_chat_template([*messages, {"role": "user", "content": text}],
                                         add_generation_prompt=True)["input_ids"]


def test_greedy_follows_the_script_and_ends_at_end_id(engine, prompt_and_script):
    prompt, script = prompt_and_script
    out = Collector()
    engine.submit(greedy(prompt), out)
    assert out.wait().tokens == script       # EOS ends it and is not part of the output
    assert len(out.emissions) == 1 and out.emissions[0].final   # not streaming: one response


def test_streaming_sends_tokens_as_they_are_made(smol, smol_tokenizer):
    # On the real model (about 10 ms a token), not the scripted one: that one can finish all its tokens
    # before a busy machine lets the relay send the first, which is correct but streams nothing.
    out = Collector()
    smol.submit(greedy(chat_ids(smol_tokenizer, "Tell me a story."), end_id=-1, max_new_tokens=32,
                       streaming=True), out)
    assert len(out.wait().tokens) == 32
    assert len(out.emissions) > 1 and [e.final for e in out.emissions] == [False] * (len(out.emissions) - 1) + [True]


def test_max_new_tokens_stop_words_and_min_length(engine, prompt_and_script):
    prompt, script = prompt_and_script
    short, stopped, longer = Collector(), Collector(), Collector()
    engine.submit(greedy(prompt, max_new_tokens=3), short)
    engine.submit(greedy(prompt, stop_words=[script[4:6]]), stopped)
    engine.submit(greedy(prompt, max_new_tokens=len(script) + 3, min_length=len(script) + 3), longer)
    assert short.wait().tokens == script[:3]
    assert stopped.wait().tokens == script[:6]   # ends on the stop word, which is included (as TensorRT-LLM)
    assert longer.wait().tokens[:len(script)] == script and len(longer.tokens) == len(script) + 3
    assert 2 not in longer.tokens                # the end id is held off until min_length


def test_concurrent_requests_share_steps_and_stay_separate(engine, prompt_and_script):
    check_concurrent_requests_stay_separate(engine, *prompt_and_script)


def test_cancellation_and_stop_request_end_generation(engine, prompt_and_script):
    prompt, script = prompt_and_script
    cancelled, stopped = Collector(), Collector()
    engine.submit(greedy(prompt, max_new_tokens=200, end_id=None), cancelled, is_cancelled=lambda: True)
    engine.submit(greedy(prompt, request_id="r-1", streaming=True, max_new_tokens=200, end_id=None), stopped)
    engine.stop("r-1")
    assert len(cancelled.wait().tokens) < 200    # the relay polls cancellation every 50 ms
    assert len(stopped.wait().tokens) < 200 and stopped.emissions[-1].final
    assert engine.load().running == 0     # their slots are free again


def test_bad_input_is_refused_by_name_and_the_engine_keeps_serving(engine, prompt_and_script):
    prompt, script = prompt_and_script
    with pytest.raises(InvalidInput, match="input_ids"):
        engine.submit(greedy([1, 10**6]), Collector())
    with pytest.raises(InvalidInput, match="input_ids"):
        engine.submit(greedy([5] * 256), Collector())      # the context is 256, prompt and answer together
    with pytest.raises(InvalidInput, match="beam_width"):
        engine.submit(greedy(prompt, beam_width=2), Collector())
    with pytest.raises(InvalidInput, match="embedding_bias"):
        engine.submit(greedy(prompt, embedding_bias=np.zeros(3, np.float32)), Collector())
    out = Collector()
    engine.submit(greedy(prompt), out)
    assert out.wait().tokens == script


def test_an_answer_stops_at_the_end_of_its_context(engine, prompt_and_script):
    prompt, _ = prompt_and_script
    out = Collector()
    engine.submit(greedy(prompt, max_new_tokens=1000, end_id=None), out)
    assert len(prompt) + len(out.wait().tokens) == 256 and out.emissions[-1].error is None


def test_logit_bias_penalties_and_log_probs(engine, prompt_and_script):
    prompt, script = prompt_and_script
    vocab = engine.vocab_size
    bias = np.zeros(vocab, np.float32)
    bias[script[0]] = -1e6                        # the script's first token is banned ... (its logits are huge)
    bias[7] = 1e6                                 # ... and token 7 forced
    forced, plain, zero_bias = Collector(), Collector(), Collector()
    engine.submit(greedy(prompt, max_new_tokens=3, embedding_bias=bias), forced)
    engine.submit(greedy(prompt, return_log_probs=True), plain)
    engine.submit(greedy(prompt, return_log_probs=True, embedding_bias=np.zeros(vocab, np.float32),
                         frequency_penalty=0.01), zero_bias)
    assert forced.wait().tokens == [7, 7, 7]
    assert plain.wait().tokens == zero_bias.wait().tokens == script
    log_probs = [p for e in plain.emissions for p in e.log_probs]
    assert len(log_probs) == len(script) and all(-5 < p <= 0 for p in log_probs)
    assert log_probs == pytest.approx([p for e in zero_bias.emissions for p in e.log_probs], abs=1e-4)


def test_generation_logits_are_the_rows_the_tokens_were_chosen_from(engine, prompt_and_script):
    prompt, script = prompt_and_script
    out = Collector()
    engine.submit(greedy(prompt, streaming=True, return_generation_logits=True), out)
    out.wait()
    assert out.tokens == script and len(out.emissions) == 1      # answered once, at the end
    logits = out.emissions[0].logits
    assert len(logits) == len(script) and [int(np.argmax(row)) for row in logits] == script


def test_a_seed_repeats_its_sample_whatever_runs_beside_it(smol, smol_tokenizer):
    prompt = chat_ids(smol_tokenizer, "Tell me about the sea.")

    def sample(seed, beside=0):
        others = [Collector() for _ in range(beside)]
        for other in others:
            smol.submit(EngineRequest("", chat_ids(smol_tokenizer, "Count to ten."), 24, end_id=-1,
                                      temperature=1.0, top_k=0, top_p=1.0), other)
        out = Collector()
        smol.submit(EngineRequest("", prompt, 16, end_id=-1, temperature=1.5, top_k=0, top_p=1.0,
                                  random_seed=seed), out)
        for other in others:
            other.wait()
        return out.wait().tokens

    first = sample(1234)
    assert sample(1234, beside=3) == first and len(first) == 16
    assert sample(99) != first


def test_a_newcomer_is_answered_while_a_long_answer_runs(smol, smol_tokenizer):
    """B arrives while A generates: B's first token comes within a few steps, B ends long before A, and A's
    answer is the one it gets alone (nothing is restarted)."""
    story, hi = chat_ids(smol_tokenizer, "Tell me a story."), chat_ids(smol_tokenizer, "Say hi.")
    alone = Collector()
    smol.submit(EngineRequest("", story, 60, end_id=-1, top_k=1), alone)
    alone.wait()
    a, b = Collector(), Collector()
    smol.submit(EngineRequest("", story, 60, end_id=-1, top_k=1, streaming=True), a)
    while len(a.tokens) < 5:
        a.done.wait(0.01)
    smol.submit(EngineRequest("", hi, 5, end_id=-1, top_k=1, repetition_penalty=1.3, min_length=3), b)
    assert len(b.wait().tokens) == 5
    assert len(a.tokens) < 40, "B waited for A's answer"
    assert a.wait().tokens[:20] == alone.tokens[:20] and len(a.tokens) == 60


def test_a_finished_sequence_frees_its_slot_for_the_next_request_at_once(smol, smol_tokenizer):
    """Four slots, five requests: the fifth starts as soon as the shortest ends, not when all four do."""
    prompt = chat_ids(smol_tokenizer, "Tell me a story.")
    long = [Collector() for _ in range(3)]
    short, fifth = Collector(), Collector()
    for out in long:
        smol.submit(EngineRequest("", prompt, 100, end_id=-1, top_k=1, streaming=True), out)
    smol.submit(EngineRequest("", prompt, 4, end_id=-1, top_k=1), short)
    smol.submit(EngineRequest("", prompt, 4, end_id=-1, top_k=1), fifth)
    assert len(short.wait().tokens) == 4 and len(fifth.wait().tokens) == 4
    assert max(len(out.tokens) for out in long) < 60, "the fifth request waited for a whole batch"
    assert [len(out.wait().tokens) for out in long] == [100] * 3


def test_prompts_of_different_lengths_in_one_step_get_what_each_gets_alone(smol, smol_tokenizer):
    prompts = [smol_tokenizer.encode(p) for p in ("The capital of France is", "One, two, three,", "Hello")]
    alone = []
    for prompt in prompts:
        out = Collector()
        smol.submit(EngineRequest("", prompt, 8, end_id=-1, top_k=1), out)
        alone.append(out.wait().tokens)
    outs = [Collector() for _ in prompts]
    for prompt, out in zip(prompts, outs):
        smol.submit(EngineRequest("", prompt, 8, end_id=-1, top_k=1), out)
    assert [out.wait().tokens for out in outs] == alone


def test_one_token_per_response_streams_as_tensorrt_llm_does(scripted_engine, prompt_and_script):
    prompt, script = prompt_and_script
    engine = LlamaCppEngine(gguf(scripted_engine), context=256, max_batch_size=2, threads=1,
                            one_token_per_response=True)
    try:
        out = stream_behind_a_slow_first_send(engine, prompt)
    finally:
        engine.shutdown()
    assert out.tokens == script
    assert all(len(e.token_ids) <= 1 for e in out.emissions)


def test_a_prompt_reuses_the_cache_of_a_finished_one_with_the_same_beginning(engine, prompt_and_script):
    """A finished sequence's cache stays in its slot: a newcomer whose prompt starts the same prefills only
    the rest, and answers what it answers from scratch."""
    prompt, script = prompt_and_script
    first, again = Collector(), Collector()
    engine.submit(greedy(prompt), first)
    first.wait()
    before = engine.reused_tokens
    engine.submit(greedy(prompt), again)
    assert again.wait().tokens == first.tokens == script
    assert engine.reused_tokens - before == len(prompt) - 1    # all but the last prompt token
    longer = Collector()           # the whole first conversation, then more: reuses prompt and answer
    engine.submit(greedy(prompt + script + prompt, max_new_tokens=4), longer)
    longer.wait()
    assert engine.reused_tokens - before >= 2 * len(prompt) - 1 + len(script) - 1


SYSTEM = ("You are a careful assistant for a lighthouse museum. Answer in one short sentence, in plain words, "
          "and never mention that you are an assistant.")


def decode(model, ids, start, slot):
    """Feed `ids` at positions start... of `slot`; the logits after the last one."""
    n = len(ids)
    model.tokens[:n], model.positions[:n], model.seq_ids[:n] = ids, np.arange(start, start + n), slot
    model.wants_logits[:n] = 0
    model.wants_logits[n - 1] = 1
    assert model.decode(n) == 0
    return model.logits(1)[0].copy()


def test_a_cache_copied_from_another_slot_is_the_one_computed_there(default_engine, smol_tokenizer):
    """A copy of slot 0's prefix into slot 1, then the rest of a prompt: the same logits to the last bit as
    computing that rest in slot 0 itself."""
    first = chat_ids(smol_tokenizer, "Who lit the lamp?", SYSTEM)
    second = chat_ids(smol_tokenizer, "How tall is it?", SYSTEM)
    shared = shared_prefix(first, second)
    tail = second[shared:]
    with LlamaModel(gguf(default_engine), slots=2, context=256, threads=1) as model:
        decode(model, first, 0, slot=0)
        model.copy(0, 1)
        model.forget(1, shared)
        copied = decode(model, tail, shared, slot=1)
        model.forget(0, shared)
        assert np.array_equal(copied, decode(model, tail, shared, slot=0))


def test_requests_arriving_together_with_one_beginning_prefill_it_once(default_engine, smol_tokenizer):
    """Four chats with one system prompt at once: the first prefills its prompt, the other three wait for
    that (one step), copy the shared beginning and prefill only their own question; each answers what it
    answers alone."""
    questions = ["Who lit the lamp?", "How tall is the tower?", "When did the last keeper leave?", "Is it open today?"]
    prompts = [chat_ids(smol_tokenizer, q, SYSTEM) for q in questions]
    assert min(shared_prefix(prompts[0], p) for p in prompts[1:]) > 30

    def answers(prompts, slots):
        engine = LlamaCppEngine(gguf(default_engine), context=256, max_batch_size=slots)
        try:
            outs = [Collector() for _ in prompts]
            for prompt, out in zip(prompts, outs):
                engine.submit(EngineRequest("", prompt, 8, end_id=-1, top_k=1), out)
            return [out.wait().tokens for out in outs], engine
        finally:
            engine.shutdown()

    together, engine = answers(prompts, slots=4)
    assert engine.copied_prefixes == 3
    own = sum(len(p) - shared_prefix(prompts[0], p) for p in prompts[1:])
    assert engine.prefilled_tokens == len(prompts[0]) + own < sum(map(len, prompts)) / 2
    assert together == [answers([p], slots=1)[0][0] for p in prompts]
