"""The prompt-prefix cache (mlx_gemma/engine/prefix.py) on a tiny random Gemma 3 whose sliding
window (8) is far shorter than the prompts, so every ring wraps.

Reference: greedy ids from uncached full forward passes of the same model (no cache, no batching),
and the same engine without the prefix cache. Each test also asserts how many prompt tokens came
from the cache, so a store that never hits cannot pass for one that works.
"""

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma.adapters import load_adapters
from mlx_gemma.convert import hf as hf_convert
from mlx_gemma.generation import BatchGenerator, Request, stream_generate
from mlx_gemma.loading import build_model, read_config
from mlx_gemma.lora import load_adapter
from mlx_gemma.engine import PrefixCache
from mlx_gemma.sampling import SamplingParams

from tiny import NoStops, greedy_alone, make_hf_model, random_ids, random_lora_adapter, save_hf_model

WINDOW = 8
MB = 1 << 20


def load_dir(path):
    return build_model(read_config(path), hf_convert.load_safetensors(hf_convert.safetensors_files(path)),
                       str(path), "float32")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_hf_model(make_hf_model("gemma3_text", sliding_window=WINDOW), tmp_path_factory.mktemp("g3"))


@pytest.fixture(scope="module")
def tiny(model_dir):
    model = load_dir(model_dir)
    assert model.config.sliding_window == WINDOW
    return model


def ids_of(n, seed, first=None):
    out = [int(t) for t in random_ids(512, (n,), seed=seed)]
    if first is not None:
        out[0] = first
    return out


def ask(engine, ids, n, adapter=0):
    """(generated ids, prompt tokens the prefix cache supplied) for one greedy request alone."""
    rid = engine.submit(Request(list(ids), SamplingParams(max_tokens=n), adapter=adapter))
    while engine.busy:
        for event in engine.step():
            if event.rid == rid and event.finish_reason:
                return event.tokens, event.prompt_cached
    raise AssertionError("the request never finished")


def stored_bytes(store):
    """Bytes of every array the store holds, counted from the arrays themselves."""
    return sum(k.nbytes + v.nbytes for e in store.entries.values() for k, v in e.prefix.layers)


def test_multi_turn_chat_reuses_the_whole_conversation(tiny):
    store = PrefixCache(64 * MB)
    engine, plain = BatchGenerator(tiny, NoStops(), prefill_step=4, prefix_cache=store), BatchGenerator(tiny, NoStops())
    history = ids_of(13, seed=1, first=2)
    for turn in range(4):
        history = history + ids_of(5, seed=10 + turn)  # the user's next message
        answer, cached = ask(engine, history, 6)
        assert answer == greedy_alone(tiny, history, 6) == ask(plain, history, 6)[0]
        # turn 1: nothing stored; later: the last turn's prompt and answer (all but the answer's
        # last id, which was sampled, never fed), a length far past the window
        assert cached == (0 if turn == 0 else previous), turn
        previous = len(history) + len(answer) - 1
        history = history + answer
    assert store.hits == 3 and store.lookups == 4


def test_shared_system_prompt(tiny):
    store = PrefixCache(64 * MB)
    engine = BatchGenerator(tiny, NoStops(), prefix_cache=store)
    system = ids_of(4, seed=2, first=2)
    for i in range(4):
        prompt = system + ids_of(3, seed=20 + i, first=100 + i)  # each question starts differently
        answer, cached = ask(engine, prompt, 5)
        assert answer == greedy_alone(tiny, prompt, 5)
        # the first prompt's entry holds 6 positions (<= the window: every ring still holds them all)
        assert cached == (0 if i == 0 else len(system))


def test_prefixes_past_the_window_are_reused_only_with_their_rings_intact(tiny):
    store = PrefixCache(64 * MB)
    engine = BatchGenerator(tiny, NoStops(), prefill_step=5, prefix_cache=store)
    long = ids_of(40, seed=3, first=2)
    ask(engine, long, 4)
    # the same prompt and more: the entry stored right after its prefill (39 positions) fits whole
    extended = long + [7, 8, 9]
    answer, cached = ask(engine, extended, 4)
    assert answer == greedy_alone(tiny, extended, 4) and cached == len(long) - 1
    # sharing only 30 ids: the whole-prompt entry's rings hold positions 31..38, not the 23..29 that
    # position 30 needs, so it is not used; the checkpoint its prefill stored at 24 (a multiple of
    # the window) is, and the rest is prefilled
    diverged = long[:30] + [11, 12, 13]
    answer, cached = ask(engine, diverged, 4)
    assert answer == greedy_alone(tiny, diverged, 4) and cached == 24


def test_a_long_shared_system_prompt_is_reused_up_to_its_last_checkpoint(tiny):
    store = PrefixCache(64 * MB)
    engine = BatchGenerator(tiny, NoStops(), prefix_cache=store)
    system = ids_of(20, seed=9, first=2)  # 2.5 windows long
    for i in range(3):
        prompt = system + ids_of(4, seed=30 + i, first=200 + i)
        answer, cached = ask(engine, prompt, 5)
        assert answer == greedy_alone(tiny, prompt, 5)
        # entries past the window serve only their whole length: the checkpoint at 16 is the
        # longest one inside the shared 20 ids
        assert cached == (0 if i == 0 else 16)


def test_adapters_and_models_never_share_keys(model_dir, tmp_path):
    dirs = {name: random_lora_adapter(load_dir(model_dir), tmp_path / name, seed=s, rank=4, alpha=8.0, scale=0.5)
            for name, s in (("a", 1), ("b", 2))}
    multi = load_dir(model_dir)
    index = load_adapters(multi, dirs)
    store = PrefixCache(64 * MB)
    engine = BatchGenerator(multi, NoStops(), prefix_cache=store)
    prompt = ids_of(20, seed=4, first=2)
    expected = {}
    for name in ("base", "a", "b"):
        single = load_dir(model_dir)
        if name != "base":
            load_adapter(single, dirs[name])
        expected[name] = greedy_alone(single, prompt + [5], 6)
    assert len({tuple(v) for v in expected.values()}) == 3  # the adapters change the answer
    seen = set()
    for name in ("base", "a", "b", "a", "base", "b"):
        answer, cached = ask(engine, prompt + [5], 6, adapter=index.get(name, 0))
        assert answer == expected[name], name
        # a miss the first time each adapter asks (another adapter's entry is never served), then
        # the entry its own prefill stored: all 20 positions before the last prompt id
        assert cached == (20 if name in seen else 0), name
        seen.add(name)
    assert store.lookups == 6 and store.hits == 3
    # another model object with the same weights shares nothing with this one
    other = BatchGenerator(load_dir(model_dir), NoStops(), prefix_cache=store)
    assert ask(other, prompt + [5], 6) == (expected["base"], 0)


def test_the_store_stays_under_its_bound(tiny):
    probe = PrefixCache(1 << 40)
    ask(BatchGenerator(tiny, NoStops(), prefix_cache=probe), ids_of(30, seed=5), 1)
    bound = int(2.5 * max(e.prefix.nbytes for e in probe.entries.values()))
    store = PrefixCache(bound)
    engine = BatchGenerator(tiny, NoStops(), prefix_cache=store)
    rng = np.random.default_rng(0)
    stored = 0
    for i in range(25):
        ask(engine, ids_of(int(rng.integers(2, 40)), seed=100 + i), int(rng.integers(1, 6)))
        assert stored_bytes(store) == store.nbytes <= bound
        stored += 2
    # it keeps what fits and evicts the least recently used
    assert 2 <= len(store) < stored and store.nbytes > bound // 3
    assert store.lookups == 25


def test_generate_takes_a_prompt_cache(tiny):
    store = PrefixCache(64 * MB)
    first = ids_of(25, seed=6, first=2)
    chunks = list(stream_generate(tiny, NoStops(), first, max_tokens=5, temp=0.0, prompt_cache=store))
    answer = chunks[-1].tokens
    follow = first + answer + ids_of(4, seed=7)
    chunks = list(stream_generate(tiny, NoStops(), follow, max_tokens=5, temp=0.0, prompt_cache=store))
    assert chunks[-1].tokens == greedy_alone(tiny, follow, 5)
    assert store.hits == 1 and store.lookups == 2


@pytest.mark.slow
def test_served_multi_turn_chat_on_the_270m(tmp_path):
    """The real 270M behind the real openai client: a three-turn chat with a shared system prompt,
    each turn's greedy text equal to `generate` without any cache, and each later turn reports at
    least the previous prompt (all but its last id) as cached."""
    openai = pytest.importorskip("openai")
    from mlx_gemma.generation import generate
    from mlx_gemma.loading import load
    from mlx_gemma.serve import create_server

    from inproc_server import running

    app, engine = create_server("gemma-3-270m", prompt_cache_mb=256)
    net, tok = load("gemma-3-270m")
    messages = [{"role": "system", "content": "你是一个知识丰富的人工智能助手，请简洁地回答。"}]
    try:
        with running(app) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
            previous = 0
            for question in ("长江有多长？", "它流经哪些省份？", "Say it again in English."):
                messages.append({"role": "user", "content": question})
                r = client.chat.completions.create(model="gemma-3-270m", messages=messages, max_tokens=16,
                                                   temperature=0)
                text = r.choices[0].message.content
                assert text == generate(net, tok, messages, max_tokens=16, temp=0.0)
                cached = r.usage.prompt_tokens_details.cached_tokens
                assert cached == 0 if previous == 0 else previous - 1 <= cached < r.usage.prompt_tokens
                previous = r.usage.prompt_tokens
                messages.append({"role": "assistant", "content": text})
            assert engine.prefix_cache.hits == 2
    finally:
        engine.stop()


def test_a_draft_model_still_drafts_after_a_prefix_hit(tiny, model_dir):
    """Speculation with a draft model on a prompt that continues a cached prefix: the drafter
    gets the whole sequence (the cached part included), and the text stays plain greedy's."""
    store = PrefixCache(64 * MB)
    drafter = load_dir(model_dir)
    first = ids_of(20, seed=8, first=2)
    list(stream_generate(tiny, NoStops(), first, max_tokens=4, temp=0.0, prompt_cache=store))
    follow = first + [9, 10]
    chunks = list(stream_generate(tiny, NoStops(), follow, max_tokens=8, temp=0.0, prompt_cache=store,
                                  draft_model=drafter))
    assert chunks[-1].tokens == greedy_alone(tiny, follow, 8)
    assert store.hits == 1 and chunks[-1].stats.drafted > 0 and chunks[-1].stats.accepted > 0
