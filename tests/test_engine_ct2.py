"""The CPU engine's scheduler on a real CTranslate2 engine: per-request limits, stop words,
end id, cancellation, `stop` requests and batching. The scripted tiny model's greedy output is
known exactly (tests/models.py)."""

import threading
import time

import pytest

from bayling.manifest import ENGINE_SUBDIRS
from tests.client_helpers import Collector
from tests.engine_checks import check_concurrent_requests_stay_separate, greedy, stream_behind_a_slow_first_send
from bayling.model_repository.engine_ct2 import Ct2Engine, EngineRequest


@pytest.fixture(scope="module")
def engine(scripted_ct2_engine):
    e = Ct2Engine(str(scripted_ct2_engine / ENGINE_SUBDIRS["ctranslate2"]), max_batch_size=8, gather_ms=50)
    yield e
    e.shutdown()
    del e.generator


def test_greedy_follows_the_script_and_ends_at_end_id(engine, prompt_and_script):
    prompt, script = prompt_and_script
    out = Collector()
    engine.submit(greedy(prompt), out)
    out.wait()
    assert out.tokens == script  # EOS ends it and is not part of the output
    assert len(out.emissions) == 1 and out.emissions[0].final  # not streaming: one response


def test_streaming_sends_tokens_as_they_are_made(engine, prompt_and_script):
    prompt, script = prompt_and_script
    out = Collector()
    engine.submit(greedy(prompt, streaming=True), out)
    out.wait()
    assert out.tokens == script
    assert len(out.emissions) > 1 and [e.final for e in out.emissions] == [False] * (len(out.emissions) - 1) + [True]


def test_a_slow_client_gets_the_tokens_made_meanwhile_in_one_response(engine, prompt_and_script):
    """The engine never waits for a send: tokens made while one is slow leave together."""
    prompt, script = prompt_and_script
    out = Collector()
    first = threading.Event()

    def slow(emission):
        if not out.emissions:
            first.wait(10)
        out(emission)

    engine.submit(greedy(prompt, streaming=True), slow)
    time.sleep(0.5)               # the whole script is generated meanwhile
    first.set()
    out.wait()
    assert out.tokens == script
    assert len(out.emissions) <= 3 and len(out.emissions[-1].token_ids) > len(script) // 2


def test_max_new_tokens_and_stop_words(engine, prompt_and_script):
    prompt, script = prompt_and_script
    short, stopped = Collector(), Collector()
    engine.submit(greedy(prompt, max_new_tokens=3), short)
    engine.submit(greedy(prompt, stop_words=[script[4:6]]), stopped)
    assert short.wait().tokens == script[:3]
    assert stopped.wait().tokens == script[:6]  # ends on the stop word, which is included (as TensorRT-LLM)


def test_concurrent_requests_share_a_batch_and_stay_separate(engine, prompt_and_script):
    check_concurrent_requests_stay_separate(engine, *prompt_and_script)


def test_cancellation_and_stop_request_end_generation(engine, prompt_and_script, scripted_ct2_engine):
    prompt, script = prompt_and_script
    cancelled, stopped = Collector(), Collector()
    engine.submit(greedy(prompt, max_new_tokens=500), cancelled, is_cancelled=lambda: True)
    engine.submit(greedy(prompt, request_id="r-1", streaming=True), stopped)
    engine.stop("r-1")
    assert len(cancelled.wait().tokens) < 8
    assert len(stopped.wait().tokens) < len(script)
    assert stopped.emissions[-1].final


@pytest.mark.parametrize("lanes", [1, 2])
def test_sampling_with_a_seed_repeats_whatever_ran_before(lanes, default_ct2_engine, smol_tokenizer):
    """With two lanes, the reload waits for the other lane's batch, which stops and goes on after it."""
    engine = Ct2Engine(str(default_ct2_engine / ENGINE_SUBDIRS["ctranslate2"]), intra_threads=1, lanes=lanes)
    prompt = smol_tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about the sea."}],
                                                add_generation_prompt=True)["input_ids"]

    def sample(seed):
        out = Collector()
        engine.submit(EngineRequest("", prompt, 16, end_id=None, temperature=1.5, top_k=0, top_p=1.0,
                                    random_seed=seed), out)
        return out.wait().tokens

    try:
        first = sample(1234)
        sample(None)  # unseeded sampling in between moves the shared random state
        beside = Collector()
        engine.submit(EngineRequest("", prompt, 80, end_id=-1, top_k=1, streaming=True), beside)
        while len(beside.tokens) < 3:
            beside.done.wait(0.01)
        assert sample(1234) == first and len(first) == 16
        assert sample(99) != first
        assert engine.reloads == 3, "seeded requests reload the engine, unseeded ones do not"
        assert len(beside.wait().tokens) == 80
    finally:
        engine.shutdown()
        del engine.generator


def test_invalid_ids_are_refused(engine):
    from bayling.errors import InvalidInput

    with pytest.raises(InvalidInput, match="input_ids"):
        engine.submit(greedy([1, 10**6]), Collector())


def test_a_request_joins_a_running_batch_instead_of_waiting(default_ct2_engine, smol_tokenizer):
    """B arrives while A generates: B is answered long before A ends, and A loses nothing."""
    engine = Ct2Engine(str(default_ct2_engine / ENGINE_SUBDIRS["ctranslate2"]), intra_threads=1)

    def prompt(text):
        return smol_tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)["input_ids"]

    try:
        alone = Collector()
        engine.submit(EngineRequest("", prompt("Tell me a story."), 60, end_id=None, top_k=1), alone)
        alone.wait()
        a, b = Collector(), Collector()
        engine.submit(EngineRequest("", prompt("Tell me a story."), 60, end_id=None, top_k=1, streaming=True), a)
        while len(a.tokens) < 5:
            assert not a.done.is_set()
            a.done.wait(0.01)
        before_join = list(a.tokens)
        engine.submit(EngineRequest("", prompt("Say hi."), 5, end_id=None, top_k=1), b)
        b.wait()
        assert len(a.tokens) < 40, "B waited for A's batch to end"
        assert engine.restarts >= 1
        a.wait()
        # A carried on where it was: nothing lost or repeated (later greedy choices may differ from a
        # run alone, as batched INT8 arithmetic is not bit-identical to batch-of-one arithmetic)
        assert a.tokens[:len(before_join)] == before_join == alone.tokens[:len(before_join)]
        assert len(a.tokens) == 60 and len(b.tokens) == 5
    finally:
        engine.shutdown()
        del engine.generator


def test_a_request_that_may_not_end_early_joins_a_running_batch(default_ct2_engine, smol_tokenizer):
    """min_length = max_new_tokens (genai-perf's fixed lengths) kept a request out of running batches: it
    waited for a whole answer. It is the same request with its end id suppressed, which can join."""
    engine = Ct2Engine(str(default_ct2_engine / ENGINE_SUBDIRS["ctranslate2"]), intra_threads=1)
    eos = smol_tokenizer.eos_token_id
    prompt = smol_tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}],
                                                add_generation_prompt=True)["input_ids"]

    def fixed(n: int, **kw) -> EngineRequest:
        return EngineRequest("", prompt, n, end_id=eos, top_k=1, min_length=n, **kw)

    try:
        alone = Collector()
        engine.submit(fixed(24), alone)
        direct = engine.generator.generate_batch([[engine.vocabulary[t] for t in prompt]], max_length=24,
                                                 min_length=24, sampling_topk=1, end_token=[eos],
                                                 include_prompt_in_result=False)
        assert alone.wait().tokens == direct[0].sequences_ids[0] and len(alone.tokens) == 24  # as min_length does
        a, b = Collector(), Collector()
        engine.submit(fixed(60, streaming=True), a)
        while len(a.tokens) < 5:
            assert not a.done.is_set()
            a.done.wait(0.01)
        restarts = engine.restarts
        engine.submit(fixed(5), b)
        b.wait()
        assert len(a.tokens) < 40 and engine.restarts > restarts, "the fixed-length request waited for the batch"
        a.wait()
        assert (len(a.tokens), len(b.tokens)) == (60, 5) and eos not in a.tokens + b.tokens
    finally:
        engine.shutdown()
        del engine.generator


def test_a_request_that_can_join_no_batch_takes_a_spare_lane(default_ct2_engine, smol_tokenizer):
    """A repetition penalty counts from the start of a CTranslate2 call, so such a request cannot join a
    running batch: with one lane it waited for A's whole answer; a spare lane starts it at once, and its
    answer is the one it gets alone."""
    engine = Ct2Engine(str(default_ct2_engine / ENGINE_SUBDIRS["ctranslate2"]), intra_threads=1, lanes=2, join_lanes=1)
    story = smol_tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a story."}],
                                               add_generation_prompt=True)["input_ids"]
    hi = smol_tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}],
                                            add_generation_prompt=True)["input_ids"]
    try:
        direct = engine.generator.generate_batch([[engine.vocabulary[t] for t in hi]], max_length=8,
                                                 repetition_penalty=1.3, sampling_topk=1, end_token=[],
                                                 include_prompt_in_result=False)[0].sequences_ids[0]
        a, b = Collector(), Collector()
        engine.submit(EngineRequest("", story, 80, end_id=-1, top_k=1, streaming=True), a)
        while len(a.tokens) < 5:
            a.done.wait(0.01)
        engine.submit(EngineRequest("", hi, 8, end_id=-1, top_k=1, repetition_penalty=1.3), b)
        assert b.wait().tokens == direct
        assert len(a.tokens) < 60, "the penalised request waited for A's batch"
        assert len(a.wait().tokens) == 80 and engine.restarts == 0
    finally:
        engine.shutdown()
        del engine.generator


def test_a_burst_is_shared_between_join_lanes_and_later_arrivals_join(default_ct2_engine, smol_tokenizer):
    engine = Ct2Engine(str(default_ct2_engine / ENGINE_SUBDIRS["ctranslate2"]), intra_threads=1, lanes=4, join_lanes=2,
                       gather_ms=50)
    prompt = smol_tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a story."}],
                                                add_generation_prompt=True)["input_ids"]
    try:
        burst = [Collector() for _ in range(4)]
        for out in burst:
            engine.submit(EngineRequest("", prompt, 60, end_id=-1, top_k=1, streaming=True), out)
        while not all(out.tokens for out in burst):
            time.sleep(0.01)
        assert sorted(len(lane.live()) for lane in engine.lanes) == [0, 0, 2, 2]
        late = Collector()
        engine.submit(EngineRequest("", prompt, 5, end_id=-1, top_k=1), late)
        assert len(late.wait().tokens) == 5 and engine.restarts == 1   # joined a busy lane, no third batch
        assert sorted(engine.batch_sizes)[-1] == 3
        assert [len(out.wait().tokens) for out in burst] == [60] * 4
    finally:
        engine.shutdown()
        del engine.generator


def test_a_newcomer_starts_its_own_batch_rather_than_stall_one_far_into_its_answers(default_ct2_engine,
                                                                                    smol_tokenizer):
    """Joining a batch 40 tokens into its answers would force 40 steps on it (CTranslate2 forwards prompts
    at once only up to the shortest): with a lane idle, the newcomer starts there, nobody restarts, and
    each answer is the one it gets alone."""
    engine = Ct2Engine(str(default_ct2_engine / ENGINE_SUBDIRS["ctranslate2"]), intra_threads=1, lanes=2, join_lanes=1,
                       join_steps=16)
    prompt = smol_tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a story."}],
                                                add_generation_prompt=True)["input_ids"]
    try:
        alone = Collector()
        engine.submit(EngineRequest("", prompt, 12, end_id=-1, top_k=1), alone)
        alone.wait()
        a, b = Collector(), Collector()
        engine.submit(EngineRequest("", prompt, 120, end_id=-1, top_k=1, streaming=True), a)
        while len(a.tokens) < 40:
            a.done.wait(0.01)
        engine.submit(EngineRequest("", prompt, 12, end_id=-1, top_k=1), b)
        assert b.wait().tokens == alone.tokens
        assert len(a.tokens) < 120, "the newcomer waited for the running batch"
        assert len(a.wait().tokens) == 120 and engine.restarts == 0
        assert sorted(engine.batch_sizes) == [1, 1, 1]
    finally:
        engine.shutdown()
        del engine.generator


def test_one_token_per_response_streams_as_tensorrt_llm_does(scripted_ct2_engine, prompt_and_script):
    prompt, script = prompt_and_script
    engine = Ct2Engine(str(scripted_ct2_engine / ENGINE_SUBDIRS["ctranslate2"]), one_token_per_response=True)
    try:
        out = stream_behind_a_slow_first_send(engine, prompt)
    finally:
        engine.shutdown()
        del engine.generator
    assert out.tokens == script
    assert all(len(e.token_ids) <= 1 for e in out.emissions)


# --- step-wise decoding (stepwise.py): logit bias, OpenAI penalties, generation logits

def test_step_wise_greedy_follows_the_script_with_the_same_log_probs(engine, prompt_and_script):
    """A zero bias takes the step-wise path and must give what generate_batch gives."""
    import numpy as np

    prompt, script = prompt_and_script
    plain, stepped = Collector(), Collector()
    engine.submit(greedy(prompt, return_log_probs=True), plain)
    plain.wait()
    vocab = len(engine.vocabulary)
    engine.submit(greedy(prompt, streaming=True, embedding_bias=np.zeros(vocab, np.float32),
                         return_generation_logits=True), stepped)
    stepped.wait()
    assert stepped.tokens == plain.tokens == script
    log_probs = [p for e in stepped.emissions for p in e.log_probs]
    assert log_probs == pytest.approx([p for e in plain.emissions for p in e.log_probs], abs=0.05)
    logits = [row for e in stepped.emissions for row in (e.logits or [])]
    assert len(logits) == len(script) and all(int(np.argmax(row)) == t for row, t in zip(logits, script))


def test_logit_bias_and_penalties_change_the_choice(engine, prompt_and_script):
    import numpy as np

    prompt, script = prompt_and_script
    vocab = len(engine.vocabulary)
    bias = np.zeros(vocab, np.float32)
    bias[script[0]] = -1e6                        # the script's first token is banned ... (its logits are huge)
    bias[7] = 1e6                                 # ... and token 7 forced
    out = Collector()
    engine.submit(greedy(prompt, max_new_tokens=3, embedding_bias=bias), out)
    assert out.wait().tokens == [7, 7, 7]


def test_openai_penalties_and_bias_are_applied_to_the_logits_as_openai_defines_them():
    import numpy as np

    from bayling.model_repository import stepwise

    raw = np.array([1.0, 2.0, 3.0, -1.0], np.float32)
    counts = np.array([0, 1, 3, 0], np.float32)
    request = EngineRequest(request_id="", input_ids=[0], max_new_tokens=4, end_id=3, min_length=2,
                            presence_penalty=0.5, frequency_penalty=0.25, embedding_bias=np.array([1, 0, 0, 0], np.float32))
    x = stepwise.adjusted(raw, request, [0, 1, 2, 2, 2], counts, n_generated=1)
    # + bias, - 0.25 * count - 0.5 * (count > 0); the end id is held off below min_length
    assert x[:3].tolist() == pytest.approx([2.0, 2.0 - 0.25 - 0.5, 3.0 - 0.75 - 0.5]) and x[3] == -np.inf
    assert stepwise.log_softmax_at(raw, 2) == pytest.approx(float(np.log(np.exp(3) / np.exp(raw).sum())))


def test_step_wise_sampling_follows_its_seed_and_the_top_k_top_p_limits():
    import numpy as np

    from bayling.model_repository import stepwise

    flat = np.zeros(1000, np.float32)
    sampling = EngineRequest(request_id="", input_ids=[0], max_new_tokens=4, temperature=1.0, top_k=0, top_p=1.0)

    def draws(seed, request=sampling, logits=flat):
        rng = np.random.default_rng(seed)
        return [stepwise.choose(logits, request, rng) for _ in range(20)]

    assert draws(5) == draws(5) and draws(5) != draws(6)
    top_k = EngineRequest(request_id="", input_ids=[0], max_new_tokens=4, top_k=3, top_p=1.0)
    ranked = np.arange(1000, dtype=np.float32) / 100
    assert set(draws(1, top_k, ranked)) <= {997, 998, 999}
    top_p = EngineRequest(request_id="", input_ids=[0], max_new_tokens=4, top_k=0, top_p=0.5)
    peaked = np.where(np.arange(1000) == 3, 20.0, 0.0).astype(np.float32)
    assert set(draws(2, top_p, peaked)) == {3}


def test_prompts_of_different_lengths_in_one_batch_get_what_each_gets_alone(default_ct2_engine, smol_tokenizer):
    """CTranslate2 forwards a batch's prompts at once only up to the shortest; the tails of longer prompts
    come back through the callback as forced steps, which must not be taken for generated tokens."""
    engine = Ct2Engine(str(default_ct2_engine / ENGINE_SUBDIRS["ctranslate2"]), gather_ms=50)
    prompts = [smol_tokenizer.encode(p) for p in ("The capital of France is", "One, two, three,", "Hello")]
    try:
        alone = []
        for prompt in prompts:
            out = Collector()
            engine.submit(EngineRequest("", prompt, 8, end_id=-1, top_k=1), out)
            alone.append(out.wait().tokens)
        before = len(engine.batch_sizes)
        outs = [Collector() for _ in prompts]
        for prompt, out in zip(prompts, outs):
            engine.submit(EngineRequest("", prompt, 8, end_id=-1, top_k=1), out)
        assert [out.wait().tokens for out in outs] == alone
        assert max(list(engine.batch_sizes)[before:]) == 3
    finally:
        engine.shutdown()
        del engine.generator


def test_generation_logits_come_from_the_same_decoding_steps_as_the_tokens(engine, prompt_and_script):
    import numpy as np

    prompt, script = prompt_and_script
    out = Collector()
    engine.submit(greedy(prompt, streaming=True, return_generation_logits=True, return_log_probs=True), out)
    out.wait()
    assert out.tokens == script and len(out.emissions) == 1      # answered once, at the end
    logits = out.emissions[0].logits
    assert len(logits) == len(script) and [int(np.argmax(row)) for row in logits] == script
