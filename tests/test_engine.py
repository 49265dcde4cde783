"""The continuous-batching engine on tiny models: rows that join a running batch, leave it, are
cancelled, or use different LoRA adapters give the tokens they give alone; references are
uncached full forward passes and the single-adapter LoRA layers (themselves checked against peft).
"""

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma.adapters import load_adapters, set_row_adapters
from mlx_gemma.cache import KVCache, RotatingKVCache
from mlx_gemma.convert import hf as hf_convert
from mlx_gemma.generation import BatchGenerator, Request, generate_step
from mlx_gemma.loading import build_model, read_config
from mlx_gemma.lora import load_adapter
from mlx_gemma.sampling import SamplingParams

from tiny import NoStops, greedy_alone, make_hf_model, random_ids, random_lora_adapter, save_hf_model


def load_dir(path):
    return build_model(read_config(path), hf_convert.load_safetensors(hf_convert.safetensors_files(path)),
                       str(path), "float32")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Gemma 3 tiny: sliding window 8 (rings wrap), global layers, MQA, vocab 512."""
    return save_hf_model(make_hf_model("gemma3_text"), tmp_path_factory.mktemp("g3"))


@pytest.fixture(scope="module")
def tiny(model_dir):
    return load_dir(model_dir)


def run(engine, joins=None):
    """Step the engine to the end; joins {step: [Request]} are submitted at that step.
    Returns {rid: tokens} and the largest decode batch seen."""
    out, widest, step = {}, 0, 0
    joins = dict(joins or {})
    while engine.busy or joins:
        for req in joins.pop(step, []):
            out[engine.submit(req)] = None
        for event in engine.step():
            if event.finish_reason:
                out[event.rid] = event.tokens
        widest = max(widest, len(engine.active))
        step += 1
    return out, widest


def test_rows_joining_mid_batch_match_uncached_greedy(tiny):
    prompts = [[2] + list(map(int, random_ids(512, (n,), seed=n))) for n in (13, 3, 9, 20, 5)]
    lengths = [17, 6, 30, 11, 9]
    expected = [greedy_alone(tiny, p, n) for p, n in zip(prompts, lengths)]
    engine = BatchGenerator(tiny, NoStops(), prefill_step=4)
    reqs = [Request(p, SamplingParams(max_tokens=n)) for p, n in zip(prompts, lengths)]
    # two start together, the others arrive while those decode (and some leave before)
    out, widest = run(engine, {0: reqs[:2], 3: reqs[2:4], 12: reqs[4:]})
    assert widest >= 3
    assert [out[i] for i in range(5)] == expected


def test_cancel_frees_the_row_and_the_others_go_on(tiny):
    prompts = [[2, 10, 11, 12], [2, 40, 41], [2, 77]]
    expected = [greedy_alone(tiny, p, 12) for p in prompts]
    engine = BatchGenerator(tiny, NoStops())
    rids = [engine.submit(Request(p, SamplingParams(max_tokens=12))) for p in prompts]
    got = {rid: [] for rid in rids}
    for _ in range(4):
        for event in engine.step():
            got[event.rid].append(event.token)
    assert len(engine.active) == 3
    event = engine.cancel(rids[1])
    assert event.finish_reason == "cancelled" and len(engine.active) == 2
    while engine.busy:
        for event in engine.step():
            got[event.rid].append(event.token)
    assert got[rids[0]] == expected[0] and got[rids[2]] == expected[2]
    assert 1 <= len(got[rids[1]]) < 12 and got[rids[1]] == expected[1][:len(got[rids[1]])]


def test_cache_rows_keep_their_positions():
    """take / concat move whole rows: a row's keys stay at its own positions."""
    a, b = KVCache(), KVCache()
    for c, fill in ((a, 1.0), (b, 2.0)):
        c.reserve(1, 1, 4, mx.float32, 3)
        c.update(mx.full((1, 1, 3, 4), fill), mx.full((1, 1, 3, 4), fill), mx.array([0]))
    a.concat(b)
    assert a.keys.shape[0] == 2 and a.keys[1, 0, 2, 0].item() == 2.0 and a.keys[0, 0, 2, 0].item() == 1.0
    a.take([1])
    assert a.keys.shape[0] == 1 and a.keys[0, 0, 0, 0].item() == 2.0
    ring = RotatingKVCache(4)
    ring.reserve(2, 1, 1, mx.float32, 10)
    assert ring.capacity == 4  # bounded by the window
    ring.update(mx.ones((2, 1, 1, 1)), mx.ones((2, 1, 1, 1)), mx.array([5, 2]))
    held = np.array(ring.slot_positions(mx.array([5, 2])))
    assert held[0].tolist() == [4, 5, 2, 3] and held[1, 2] == 2 and held[1, 3] < 0


def random_adapter(model_dir, out, seed):
    return random_lora_adapter(load_dir(model_dir), out, seed=seed, rank=4 + seed, alpha=8.0, scale=0.5)


def test_per_row_adapters_equal_each_adapter_alone(model_dir, tmp_path):
    dirs = {"a": random_adapter(model_dir, tmp_path / "a", 1), "b": random_adapter(model_dir, tmp_path / "b", 2)}
    prompt = [2, 100, 101, 102, 103]
    expected = {}
    for name, path in [("base", None), *dirs.items()]:
        model = load_dir(model_dir)
        if path:
            load_adapter(model, path)
        expected[name] = [t.item() for t in generate_step(model, mx.array([prompt]), max_tokens=10)]
    assert expected["a"] != expected["base"] and expected["b"] != expected["a"]  # the adapters matter
    multi = load_dir(model_dir)
    index = load_adapters(multi, dirs)
    # logits of one batch with rows base / a / b equal each model alone (float32)
    for name, row in (("base", 0), ("a", index["a"]), ("b", index["b"])):
        single = load_dir(model_dir)
        if row:
            load_adapter(single, dirs[name])
        set_row_adapters(multi, mx.array([0, index["a"], index["b"]]))
        together = multi(mx.array([prompt] * 3))
        np.testing.assert_allclose(np.array(together[[0, index["a"], index["b"]].index(row)]),
                                   np.array(single(mx.array([prompt]))[0]), atol=1e-4)
    set_row_adapters(multi, None)
    engine = BatchGenerator(multi, NoStops())
    reqs = {name: Request(prompt, SamplingParams(max_tokens=10), adapter=index.get(name, 0))
            for name in ("base", "a", "b")}
    rids = {name: engine.submit(req) for name, req in reqs.items()}
    out, _ = run(engine)
    assert {name: out[rid] for name, rid in rids.items()} == expected


def test_a_dead_engine_answers_every_request_instead_of_hanging(tiny):
    """A bug in a step stops the engine thread: requests in flight, queued, and sent later all
    get the error (the server turns it into a 500 / 503), none waits forever."""
    import asyncio

    from mlx_gemma.serve.engine import Engine

    engine = Engine(tiny, NoStops())

    def broken():
        raise RuntimeError("boom")

    engine.generator.step = broken

    async def ask():
        job = engine.submit([2, 10, 11], SamplingParams(max_tokens=4), 0, asyncio.get_running_loop())
        with pytest.raises(RuntimeError, match="boom"):
            await asyncio.wait_for(job.__anext__(), timeout=60)

    async def scenario():
        first = asyncio.create_task(ask())
        second = asyncio.create_task(ask())  # queued behind the first
        engine.start()
        await asyncio.gather(first, second)
        assert not engine.alive
        await ask()  # after the engine stopped

    asyncio.run(scenario())


def test_one_engine_per_model_traces_the_decode_step_once(model_dir, tmp_path):
    """generate / batch_generate / ChatSession-style calls on one model share its engine: the
    compiled decode step is built and traced once for a buffer shape, not once per call; when
    the weights change (an adapter is loaded) the step is rebuilt and decodes with them."""
    from mlx_gemma import backend
    from mlx_gemma.engine import engine_for
    from mlx_gemma.generation import batch_generate

    model = load_dir(model_dir)
    prompt = [2, 10, 11, 12]
    with backend.override(host_decode=False, host_gemv=False):  # the compiled step on the CPU too
        first = batch_generate(model, NoStops(), [prompt], max_tokens=4, details=True)[0].tokens
        engine = engine_for(model)
        step = engine.step()
        assert step.traces == 1
        again = batch_generate(model, NoStops(), [prompt], max_tokens=4, details=True)[0].tokens
        assert engine_for(model) is engine and engine.step() is step and step.traces == 1
        assert first == again == greedy_alone(model, prompt, 4)
        load_adapter(model, random_adapter(model_dir, tmp_path / "a", 1))
        adapted = batch_generate(model, NoStops(), [prompt], max_tokens=4, details=True)[0].tokens
        assert engine.step() is not step
    assert adapted == greedy_alone(model, prompt, 4) != first


def test_an_embedding_wider_than_the_tokenizer_never_yields_an_unreadable_id(tmp_path):
    """Padded or multimodal embedding tables have rows the tokenizer has no piece for. Here those
    rows are made the model's favourites (the precondition is checked on the full logits); the
    engine must still sample only ids the detokenizer reads, greedy and at temperature 1, instead
    of stopping with an error for every row in the batch."""
    from chat_tiny import tokenizer_dir
    from mlx_gemma.loading import load
    from mlx_gemma.tokenizer import GemmaTokenizer

    tokenizer_dir(tmp_path, gemma4=False)
    vocab = GemmaTokenizer(tmp_path).vocab_size
    save_hf_model(make_hf_model("gemma3_text", seed=3, vocab_size=vocab + 64), tmp_path)
    model, tok = load(str(tmp_path))
    table = model.model.embed_tokens.weight
    extra = mx.random.normal((64, table.shape[1]), key=mx.random.key(0)) * 50.0
    model.model.embed_tokens.weight = mx.concatenate([table[:vocab], extra.astype(table.dtype)])
    prompt = tok.encode("hello")
    assert int(mx.argmax(model(mx.array([prompt]))[0, -1]).item()) >= vocab  # the trap is set

    engine = BatchGenerator(model, tok)
    for params in (SamplingParams(temp=0.0, max_tokens=6), SamplingParams(temp=1.0, seed=1, max_tokens=6)):
        engine.submit(Request(ids=prompt, params=params))
    tokens = []
    while engine.busy:
        tokens += [e.token for e in engine.step() if e.token is not None]
    assert tokens and all(0 <= t < vocab for t in tokens)
