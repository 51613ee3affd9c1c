"""The OpenAI-compatible judge against a real HTTP server on 127.0.0.1: request format, retries on every kind
of fault, giving up, round-robin and failover, bounded concurrency, API-key hygiene, the on-disk cache."""

import asyncio
import base64
import logging

import pytest

from balcap_jax.rewards.judges.openai_compatible import OpenAICompatibleConfig, OpenAICompatibleJudge
from balcap_jax.rewards.judges.protocol import ImagePart, JudgeUnavailable, generate_all, user_request
from tests.rewards.rewards_fake_server import PERMANENT_FAULTS, ServerSpec
from tests.rewards.conftest import png_bytes

LINGUISTIC_PROMPT = "<caption>\nA red ball.\n</caption>"
EXPECTED = '{"clarity": 7, "fluency": 9, "coherence": 8}'
FAST = dict(request_timeout_s=0.5, connect_timeout_s=0.5, backoff_initial_s=0.01, backoff_max_s=0.05, max_attempts=3)


def judge_for(*urls, **overrides):
    return OpenAICompatibleJudge(OpenAICompatibleConfig(model="judge-m", base_urls=urls, **(FAST | overrides)))


def ask(judge, *requests):
    return asyncio.run(generate_all(judge, requests or (user_request(LINGUISTIC_PROMPT),)))


def test_chat_request_body_with_image_seed_and_extra_body(fake_server):
    server = fake_server()
    judge = judge_for(server.base_url, multimodal=True, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    image = png_bytes()
    request = user_request(ImagePart(image), "<claims>\n{\"id\": \"c1\", \"claim\": \"a red square\"}\n</claims>",
                           system="Be strict.", max_tokens=77, temperature=0.3, seed=5)  # fmt: skip
    [reply] = ask(judge, request)
    assert reply.text == '{"verdicts": [{"id": "c1", "correct": true, "pointable": true}]}'
    assert not reply.cached and reply.attempts == 1
    [body] = server.bodies
    assert body["model"] == "judge-m" and body["max_tokens"] == 77 and body["temperature"] == 0.3
    assert body["seed"] == 5 and body["chat_template_kwargs"] == {"enable_thinking": False}
    system, user = body["messages"]
    assert system == {"role": "system", "content": "Be strict."}
    image_part, text_part = user["content"]
    assert image_part["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(image).decode()
    assert text_part["type"] == "text" and text_part["text"].startswith("<claims>")
    assert server.paths == {"/v1/chat/completions": 1}


def test_text_only_judge_refuses_images_and_completions_api_works(fake_server):
    server = fake_server()
    with pytest.raises(ValueError, match="multimodal=False"):
        ask(judge_for(server.base_url), user_request(ImagePart(png_bytes()), "x"))
    [reply] = ask(judge_for(server.base_url, api="completions"))
    assert reply.text == EXPECTED
    assert server.paths == {"/v1/completions": 1} and server.bodies[0]["prompt"] == LINGUISTIC_PROMPT


@pytest.mark.parametrize("fault", PERMANENT_FAULTS + ("slow",))
def test_each_transient_fault_is_retried_and_recovers(fake_server, fault):
    server = fake_server(ServerSpec(first_attempt_fault=fault, timeout_sleep_s=1.5))
    judge = judge_for(server.base_url)
    [reply] = ask(judge)
    assert reply.text == EXPECTED
    expected_attempts = 1 if fault == "slow" else 2
    assert reply.attempts == expected_attempts and server.http_requests == expected_attempts
    assert judge.stats.retries == expected_attempts - 1 and judge.stats.failures == 0


@pytest.mark.parametrize("fault", ["http_500", "drop", "timeout", "empty_choices"])
def test_permanent_faults_give_up_after_max_attempts(fake_server, fault):
    server = fake_server(ServerSpec(forced_fault=fault, timeout_sleep_s=1.0))
    judge = judge_for(server.base_url, request_timeout_s=0.2)
    [result] = ask(judge)
    assert isinstance(result, JudgeUnavailable) and "after 3 attempt(s)" in str(result)
    assert server.http_requests == 3 and judge.stats.failures == 1


def test_retry_after_is_honoured(fake_server):
    server = fake_server(ServerSpec(first_attempt_fault="http_429", retry_after_s=0.3))
    [reply] = ask(judge_for(server.base_url))
    assert reply.text == EXPECTED and reply.attempts == 2 and reply.latency_s >= 0.3


def test_client_errors_are_not_retried(fake_server):
    server = fake_server(ServerSpec(forced_fault="http_400"))
    [result] = ask(judge_for(server.base_url))
    assert isinstance(result, JudgeUnavailable) and "HTTP 400" in str(result) and server.http_requests == 1


def test_unreachable_server_gives_up_quickly():
    [result] = ask(judge_for("http://127.0.0.1:9/v1"))  # discard port: connection refused
    assert isinstance(result, JudgeUnavailable) and "ConnectError" in str(result)


def test_round_robin_and_failover_across_base_urls(fake_server):
    first, second = fake_server(), fake_server()
    ask(judge_for(first.base_url, second.base_url), *[user_request(f"<caption>\n{i}\n</caption>") for i in range(10)])
    assert first.http_requests == second.http_requests == 5
    broken, healthy = fake_server(ServerSpec(forced_fault="http_500")), fake_server()
    replies = ask(judge_for(broken.base_url, healthy.base_url),
                  *[user_request(f"<caption>\n{i}\n</caption>") for i in range(10)])  # fmt: skip
    assert all(not isinstance(r, JudgeUnavailable) for r in replies)
    assert healthy.http_requests == 10 and broken.http_requests > 0


def test_concurrency_is_bounded_by_the_semaphore(fake_server):
    server = fake_server(ServerSpec(latency_s=0.05))
    requests = [user_request(f"<caption>\n{i}\n</caption>") for i in range(24)]
    ask(judge_for(server.base_url, max_concurrency=4), *requests)
    assert server.max_in_flight == 4
    ask(judge_for(server.base_url, max_concurrency=24), *requests)
    assert server.max_in_flight > 4


def test_api_key_from_env_is_sent_but_never_shown(fake_server, monkeypatch, caplog):
    secret = "sk-test-very-secret-4242"
    monkeypatch.setenv("BALCAP_TEST_JUDGE_KEY", secret)
    server = fake_server(ServerSpec(first_attempt_fault="http_500"))
    judge = judge_for(server.base_url, api_key_env="BALCAP_TEST_JUDGE_KEY")
    failing = judge_for("http://127.0.0.1:9/v1", api_key_env="BALCAP_TEST_JUDGE_KEY")
    with caplog.at_level(logging.DEBUG):
        [reply] = ask(judge)
        [error] = ask(failing)
    assert server.authorization == {f"Bearer {secret}"} and reply.text == EXPECTED
    shown = " ".join([repr(judge), repr(judge.config), str(error), caplog.text])
    assert "BALCAP_TEST_JUDGE_KEY" in repr(judge) and secret not in shown
    monkeypatch.delenv("BALCAP_TEST_JUDGE_KEY")
    with pytest.raises(ValueError, match=r"\$BALCAP_TEST_JUDGE_KEY"):
        judge_for(server.base_url, api_key_env="BALCAP_TEST_JUDGE_KEY")


def test_second_run_is_served_from_the_disk_cache(fake_server, tmp_path):
    server = fake_server()
    requests = [user_request(f"<caption>\nball {i}\n</caption>") for i in range(6)]
    first = ask(judge_for(server.base_url, cache_path=str(tmp_path / "judge.sqlite")), *requests)
    assert server.http_requests == 6 and not any(r.cached for r in first)
    fresh_judge = judge_for(server.base_url, cache_path=str(tmp_path / "judge.sqlite"))  # a new process, same file
    second = ask(fresh_judge, *requests)
    assert server.http_requests == 6 and all(r.cached and r.attempts == 0 for r in second)
    assert [r.text for r in second] == [r.text for r in first] and fresh_judge.stats.cache_hits == 6
    ask(fresh_judge, requests[0].with_seed(1), user_request(requests[0].messages[0].text, temperature=0.5))
    assert server.http_requests == 8  # sampling parameters are part of the key
    other_model = OpenAICompatibleJudge(
        OpenAICompatibleConfig(model="other", base_urls=(server.base_url,), cache_path=str(tmp_path / "judge.sqlite"))
    )
    ask(other_model, requests[0])
    assert server.http_requests == 9


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="base_urls"):
        OpenAICompatibleConfig(model="m", base_urls=("localhost:8000/v1",))
    with pytest.raises(ValueError, match="max_concurrency"):
        OpenAICompatibleConfig(model="m", base_urls=("http://h/v1",), max_concurrency=0)
    with pytest.raises(ValueError, match="api must be"):
        OpenAICompatibleConfig(model="m", base_urls=("http://h/v1",), api="responses")


def test_completions_batching_groups_prompts_and_maps_answers_back(fake_server, tmp_path):
    server = fake_server()
    judge = judge_for(server.base_url, api="completions", completion_batch_size=4, completion_batch_window_s=0.05,
                      cache_path=str(tmp_path / "c.sqlite"))  # fmt: skip
    captions = [f"ball {i} {i}" if i % 3 == 0 else f"ball {i}" for i in range(10)]  # stutters score fluency 3
    requests = [user_request(f"<caption>\n{c}\n</caption>") for c in captions]
    replies = ask(judge, *requests, user_request("<caption>\nhot\n</caption>", temperature=0.5))
    assert [len(b["prompt"]) for b in server.bodies if b["temperature"] == 0.0] == [4, 4, 2]
    assert [b["prompt"] for b in server.bodies if b["temperature"] == 0.5] == [["<caption>\nhot\n</caption>"]]
    fluency = [int(r.text.split('"fluency": ')[1].split(",")[0]) for r in replies[:10]]
    assert fluency == [3 if i % 3 == 0 else 9 for i in range(10)]  # answers found their prompts (choices shuffled)
    cached = ask(judge, requests[1], requests[2])
    assert all(r.cached for r in cached) and len(server.bodies) == 4  # each prompt is cached on its own
    broken = fake_server(ServerSpec(forced_fault="http_500"))
    failing = judge_for(broken.base_url, api="completions", completion_batch_size=4, completion_batch_window_s=0.01)
    results = ask(failing, *requests[:5])
    assert all(isinstance(r, JudgeUnavailable) for r in results) and broken.http_requests == 2 * 3
