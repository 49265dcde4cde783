"""`mlx-gemma generate --json-schema FILE` on the command line (README's structured-output example):
the printed answer validates with jsonschema and equals the library's `generate` with the same
schema, seed and temperature."""

import json

import jsonschema
import pytest
from click.testing import CliRunner

pytestmark = pytest.mark.slow  # the 270M model

# README's schema with the population bounded: unbounded, a sampled integer can run past max_tokens
SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                           "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
          "required": ["city", "population"], "additionalProperties": False}


def test_generate_json_schema_file(tmp_path):
    from mlx_gemma.cli import main
    from mlx_gemma.generation import generate
    from mlx_gemma.loading import load

    path = tmp_path / "city.schema.json"
    path.write_text(json.dumps(SCHEMA))
    res = CliRunner().invoke(main, ["generate", "--prompt", "A city as JSON", "--json-schema", str(path),
                                    "--temp", "1", "--seed", "3", "--max-tokens", "60"])
    assert res.exit_code == 0, res.output
    answer = res.stdout.rstrip("\n")
    jsonschema.validate(json.loads(answer), SCHEMA)
    model, tok = load("gemma-3-270m")
    assert answer == generate(model, tok, [{"role": "user", "content": "A city as JSON"}], json_schema=SCHEMA,
                              temp=1.0, seed=3, max_tokens=60)


def test_generate_json_schema_file_that_is_not_json_is_one_line(tmp_path):
    from mlx_gemma.cli import main

    path = tmp_path / "bad.json"
    path.write_text("{not json")
    res = CliRunner().invoke(main, ["generate", "--prompt", "x", "--json-schema", str(path)])
    assert res.exit_code == 1 and str(path) in res.output and len(res.output.strip().splitlines()) == 1, res.output
