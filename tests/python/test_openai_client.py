"""The daemon driven by the official `openai` Python package, as users will."""

import openai
import pytest
from openai import OpenAI


@pytest.fixture(scope="module")
def client(daemon):
    return OpenAI(base_url=f"{daemon}/v1", api_key="unused", max_retries=0)


def case(golden, name):
    return next(c for c in golden["cases"] if c["name"] == name)


def test_models_list(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny-random-qwen2"]


def test_completion_matches_golden(client, golden):
    c = case(golden, "plain_en")
    r = client.completions.create(
        model="tiny-random-qwen2", prompt=c["prompt"], max_tokens=32, temperature=0,
        extra_body={"ignore_eos": True, "skip_special_tokens": False},
    )
    assert r.choices[0].text == c["generated_text"]
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == c["prompt_len"]
    assert r.usage.completion_tokens == 32


def test_chat_completion_matches_golden(client, golden):
    c = case(golden, "chat_single_turn")
    r = client.chat.completions.create(
        model="tiny-random-qwen2", messages=c["messages"], max_tokens=32, temperature=0,
        extra_body={"ignore_eos": True, "skip_special_tokens": False},
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == c["generated_text"]
    assert r.usage.prompt_tokens == c["prompt_len"]


def test_chat_streaming_with_usage(client, golden):
    c = case(golden, "chat_single_turn")
    stream = client.chat.completions.create(
        model="tiny-random-qwen2", messages=c["messages"], max_tokens=32, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "skip_special_tokens": False},
    )
    text, usage, roles = "", None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        delta = chunk.choices[0].delta
        if delta.role:
            roles.append(delta.role)
        text += delta.content or ""
    assert roles == ["assistant"]
    assert text == c["generated_text"]
    assert usage.completion_tokens == 32


def test_completion_streaming(client, golden):
    c = case(golden, "short")
    stream = client.completions.create(
        model="tiny-random-qwen2", prompt=c["prompt"], max_tokens=32, temperature=0,
        stream=True, extra_body={"ignore_eos": True, "skip_special_tokens": False},
    )
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == c["generated_text"]


def test_unknown_model_is_a_typed_error(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert e.value.status_code == 404
    assert e.value.code == "model_not_found"


def test_context_overflow_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-random-qwen2", prompt="hi", max_tokens=100000)
    assert e.value.code == "context_length_exceeded"
