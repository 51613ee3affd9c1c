"""Structured output: every prompt kind sends its JSON Schema (bounded arrays and strings) in the form vLLM and
SGLang accept, or json_object, or nothing; and the response cache never keeps an answer that failed to parse."""

import asyncio
import math

import pytest

from balcap_jax.rewards.caprl_qa import CapRLQAConfig, CapRLQAReward
from balcap_jax.rewards.json_output import OneOf, Range
from balcap_jax.rewards.json_schema import json_schema, response_schema
from balcap_jax.rewards.judges.openai_compatible import OpenAICompatibleConfig, OpenAICompatibleJudge
from balcap_jax.rewards.judges.protocol import user_request
from balcap_jax.rewards.judges.response_cache import ResponseCache
from balcap_jax.rewards.judges.scripted import tagged_section
from balcap_jax.rewards.linguistic import LinguisticReward
from balcap_jax.rewards.precision import PrecisionConfig, PrecisionReward
from balcap_jax.rewards.prompt_templates import render_prompt
from balcap_jax.rewards.recall import RecallReward
from balcap_jax.rewards.types import RewardItem
from tests.rewards.conftest import png_bytes
from tests.rewards.rewards_fake_server import GARBAGE, ServerSpec

FAST = dict(request_timeout_s=2.0, connect_timeout_s=1.0, backoff_initial_s=0.01, backoff_max_s=0.05, max_attempts=2)
CAPTION = "A red ball lies on the floor. A wooden box stands behind."
QUESTIONS = [{"question": "What colour is the ball?", "options": ["red", "blue"], "answer": "red"}]


def judge_for(server, **overrides):
    config = dict(model="judge-m", base_urls=(server.base_url,), multimodal=True)
    return OpenAICompatibleJudge(OpenAICompatibleConfig(**(config | FAST | overrides)))


def prompt_kind(body) -> str:
    """Which prompt a body carries, from the tagged sections of its text (not from the schema under test)."""
    text = "\n".join(
        m["content"] if isinstance(m["content"], str) else "\n".join(p.get("text", "") for p in m["content"])
        for m in body["messages"]
    )
    for tag, kind in (("question", "caption_qa"), ("reference_facts", "coverage"), ("claims", "verify_claims"),
                      ("description", "decompose_claims"), ("caption", "linguistic")):  # fmt: skip
        if tagged_section(text, tag) is not None:
            return kind
    raise AssertionError("unknown prompt")


def score_every_kind(judge):
    item = RewardItem("img", CAPTION, ("A red ball lies on the floor.",), png_bytes(), {"questions": QUESTIONS})
    components = [
        PrecisionReward(judge, judge, PrecisionConfig(max_claims=10, claims_per_call=2)),
        RecallReward(judge),
        LinguisticReward(judge),
        CapRLQAReward(judge, CapRLQAConfig(num_draws=1)),
    ]
    return [asyncio.run(c.score([item]))[0] for c in components]


def arrays_and_strings(schema):
    """Every array and string node of a JSON Schema."""
    if schema["type"] in ("array", "string"):
        yield schema
    for child in list(schema.get("properties", {}).values()) + ([schema["items"]] if "items" in schema else []):
        yield from arrays_and_strings(child)


@pytest.mark.parametrize("mode", ["json_schema", "json_object", "none"])
def test_each_prompt_kind_sends_its_schema_in_the_configured_form(fake_server, mode):
    server = fake_server()
    scores = score_every_kind(judge_for(server, response_format=mode))
    assert all(not math.isnan(s.value) for s in scores)  # the answers still parse in every mode
    kinds = {}
    for body in server.bodies:
        kinds.setdefault(prompt_kind(body), []).append(body)
    assert set(kinds) == {"decompose_claims", "verify_claims", "coverage", "linguistic", "caption_qa"}
    for kind, bodies in kinds.items():
        for body in bodies:
            if mode == "none":
                assert "response_format" not in body
            elif mode == "json_object":
                assert body["response_format"] == {"type": "json_object"}
            else:
                form = body["response_format"]
                assert form["type"] == "json_schema" and set(form["json_schema"]) == {"name", "schema", "strict"}
                assert form["json_schema"]["name"] == kind and form["json_schema"]["strict"] is True
                schema = form["json_schema"]["schema"]
                assert schema["type"] == "object" and schema["additionalProperties"] is False
                assert schema["required"] == list(schema["properties"])
                for node in arrays_and_strings(schema):
                    assert node.get("maxItems" if node["type"] == "array" else "maxLength", 0) >= 1
    if mode == "json_schema":
        def items_bound(kind):
            return [next(iter(b["response_format"]["json_schema"]["schema"]["properties"].values()))["maxItems"]
                    for b in kinds[kind]]  # fmt: skip

        # max_claims + 1 (precision's 10, recall's default 100 for the reference): truncation stays visible.
        assert sorted(items_bound("decompose_claims")) == [11, 101]
        assert items_bound("verify_claims") == [2]  # one verdict per claim of the chunk
        assert items_bound("coverage") == [1]  # one decision per reference fact
        linguistic = kinds["linguistic"][0]["response_format"]["json_schema"]["schema"]
        assert linguistic["properties"]["fluency"] == {"type": "number", "minimum": 1.0, "maximum": 10.0}


def test_json_schema_maps_every_declarative_node_and_keeps_key_order():
    schema = {"rows": [{"id": str, "ok": bool, "n": int, "x": float, "r": Range(0, 1), "pick": OneOf("A", "B")}]}
    converted = json_schema(schema, max_items=5, max_length=9)
    row = converted["properties"]["rows"]
    assert row["maxItems"] == 5 and row["type"] == "array"
    assert row["items"]["properties"] == {
        "id": {"type": "string", "maxLength": 9}, "ok": {"type": "boolean"}, "n": {"type": "integer"},
        "x": {"type": "number"}, "r": {"type": "number", "minimum": 0, "maximum": 1},
        "pick": {"type": "string", "enum": ["a", "b"]},
    }  # fmt: skip
    assert list(row["items"]["properties"]) == list(schema["rows"][0])  # decoders emit keys in schema order
    with pytest.raises(ValueError, match="must match"):
        response_schema("has space", schema)
    with pytest.raises(TypeError, match="unsupported"):
        json_schema({"a": set()})


def linguistic_item():
    return RewardItem("img", "A red ball.", ("r",))


def test_an_unparsable_reply_is_not_cached_and_the_reask_carries_another_seed(fake_server, tmp_path):
    server = fake_server(ServerSpec(garbage_first_requests=1))
    cache_path = str(tmp_path / "judge.sqlite")
    judge = judge_for(server, cache_path=cache_path)
    [score] = asyncio.run(LinguisticReward(judge).score([linguistic_item()]))
    assert not math.isnan(score.value) and score.record["reasks"] == 1
    first, second = server.bodies
    assert first.get("seed") != second.get("seed") and second["seed"] == 1
    assert len(judge.cache) == 1 and judge.stats.uncached == 1  # only the usable answer is stored
    again = judge_for(server, cache_path=cache_path)
    [replayed] = asyncio.run(LinguisticReward(again).score([linguistic_item()]))
    # The failed first ask was not stored, so a re-run asks it again (and now gets a usable answer).
    assert server.http_requests == 3 and replayed.value == score.value and replayed.record["reasks"] == 0


def test_a_rerun_after_an_all_invalid_run_asks_the_server_again(fake_server, tmp_path):
    server = fake_server(ServerSpec(garbage_first_requests=3))  # every attempt of the first run
    cache_path = str(tmp_path / "judge.sqlite")
    [failed] = asyncio.run(LinguisticReward(judge_for(server, cache_path=cache_path)).score([linguistic_item()]))
    assert math.isnan(failed.value) and failed.errors == 1 and server.http_requests == 3
    assert len(ResponseCache(cache_path)) == 0
    [recovered] = asyncio.run(LinguisticReward(judge_for(server, cache_path=cache_path)).score([linguistic_item()]))
    assert not math.isnan(recovered.value) and server.http_requests == 4 and recovered.record["cache_hits"] == 0


def test_an_unusable_reply_already_in_the_cache_is_asked_again(fake_server, tmp_path):
    server = fake_server(ServerSpec(garbage_first_requests=1))
    judge = judge_for(server, cache_path=str(tmp_path / "judge.sqlite"), response_format="none")
    # The request LinguisticReward makes, without an accept predicate: stored whatever it says, as older runs did.
    request = user_request(render_prompt("linguistic", 1, caption="A red ball."), max_tokens=512)
    assert asyncio.run(judge.generate(request)).text == GARBAGE and len(judge.cache) == 1
    [score] = asyncio.run(LinguisticReward(judge).score([linguistic_item()]))  # mode "none": the same body
    assert not math.isnan(score.value) and score.record["cache_hits"] == 0 and server.http_requests == 2
    [(text,)] = judge.cache._connection.execute("SELECT text FROM replies").fetchall()
    assert text != GARBAGE and len(judge.cache) == 1  # the usable answer replaced the stored failure
