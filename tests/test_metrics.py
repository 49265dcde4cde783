"""`GET /metrics` after real requests: the text is parsed by prometheus_client's own parser and
its counts are held to what the test sent (tokens, statuses, one histogram sample per answer).

A tiny random Gemma 3 served in-process on loopback (tests/inproc_server.py); the requests go
through the real `openai` client and raw HTTP.
"""

import http.client
import json

import pytest

openai = pytest.importorskip("openai")
parser = pytest.importorskip("prometheus_client.parser")

from inproc_server import running  # noqa: E402
from tiny import NoStops, make_hf_model, random_ids, save_hf_model  # noqa: E402

KEY = "metrics-key"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from mlx_gemma.convert import hf as hf_convert
    from mlx_gemma.loading import build_model, read_config
    from mlx_gemma.serve.app import build_app
    from mlx_gemma.serve.engine import Engine

    path = save_hf_model(make_hf_model("gemma3_text"), tmp_path_factory.mktemp("g3"))
    model = build_model(read_config(path), hf_convert.load_safetensors(hf_convert.safetensors_files(path)),
                        str(path), "float32")
    engine = Engine(model, NoStops(), prompt_cache_bytes=64 << 20)
    engine.start()
    with running(build_app(engine, "tiny", api_key=KEY)) as url:
        yield url, engine
    engine.stop()


def scrape(url, key=KEY):
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {key}"} if key else {})
    resp = conn.getresponse()
    return resp.status, resp.getheader("content-type"), resp.read().decode()


def post(url, path, body, key=KEY):
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json",
                                                             "Authorization": f"Bearer {key}"})
    resp = conn.getresponse()
    resp.read()
    return resp.status


def samples(text):
    """{(sample name, frozenset(labels)): value} from the exposition text."""
    out = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found, name, **labels):
    return found[(name, frozenset(labels.items()))]


def test_metrics_count_what_was_sent(served):
    served, engine = served
    client = openai.OpenAI(base_url=f"{served}/v1", api_key=KEY, max_retries=0, timeout=120)
    # distinct first ids: no prompt shares a prefix with another
    prompts = [[10 + i] + random_ids(512, (n - 1,), seed=n).tolist() for i, n in enumerate((5, 17, 40))]
    lengths = [3, 6, 9]
    for ids, n in zip(prompts, lengths):
        r = client.completions.create(model="tiny", prompt=ids, max_tokens=n, temperature=0)
        assert r.usage.completion_tokens == n and r.usage.prompt_tokens == len(ids)
        assert r.usage.prompt_tokens_details.cached_tokens == 0
    # the first prompt again: all but its last id come from the prefix cache
    chunks = list(client.completions.create(model="tiny", prompt=prompts[0], max_tokens=4, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert sum(len(c.choices[0].text) for c in chunks if c.choices) == 4
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == len(prompts[0]) - 1
    assert post(served, "/v1/completions", {"model": "nope", "prompt": [2, 3]}) == 404
    assert post(served, "/v1/completions", {"prompt": [2, 3], "n": 2}) == 400
    assert post(served, "/v1/completions", {"prompt": [2, 3]}, key="wrong") == 401
    assert scrape(served, key=None)[0] == 401  # the metrics need the key like every /v1 route

    status, content_type, text = scrape(served)
    assert status == 200 and content_type.startswith("text/plain")
    found = samples(text)
    ok = len(prompts) + 1
    assert value(found, "mlx_gemma_requests_total", endpoint="/v1/completions", status="200") == ok
    for code in ("404", "400", "401"):
        assert value(found, "mlx_gemma_requests_total", endpoint="/v1/completions", status=code) == 1
    assert value(found, "mlx_gemma_prompt_tokens_total") == sum(map(len, prompts)) + len(prompts[0])
    assert value(found, "mlx_gemma_generation_tokens_total") == sum(lengths) + 4
    assert value(found, "mlx_gemma_time_to_first_token_seconds_count") == ok
    assert value(found, "mlx_gemma_time_to_first_token_seconds_bucket", le="+Inf") == ok
    assert value(found, "mlx_gemma_time_to_first_token_seconds_sum") > 0
    assert value(found, "mlx_gemma_time_per_output_token_seconds_count") == ok  # every answer had > 1 token
    assert value(found, "mlx_gemma_running_rows") == 0 and value(found, "mlx_gemma_waiting_rows") == 0
    assert value(found, "mlx_gemma_prompt_cached_tokens_total") == len(prompts[0]) - 1
    assert value(found, "mlx_gemma_prompt_cache_lookups_total") == ok
    assert value(found, "mlx_gemma_prompt_cache_hits_total") == 1
    assert value(found, "mlx_gemma_prompt_cache_hit_rate") == 1 / ok
    held = sum(k.nbytes + v.nbytes for e in engine.prefix_cache.entries.values() for k, v in e.prefix.layers)
    assert value(found, "mlx_gemma_prompt_cache_bytes") == held > 0
    assert value(found, "mlx_gemma_prompt_cache_entries") == len(engine.prefix_cache.entries)
