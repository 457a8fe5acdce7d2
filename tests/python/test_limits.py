"""The connection layer's refusals as the openai SDK meets them: an oversized upload must reach
the client as the 413 it is (an APIStatusError it does not retry), not as a connection reset
that the SDK reports as a network error and uploads again."""

import openai
import pytest


def test_an_oversized_upload_is_a_413_status_error_not_a_network_error(model_daemon):
    url = model_daemon("tiny-random-qwen2", "--max-body-bytes", "1MiB")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    big = "x" * (5 << 20)
    for attempt in range(5):
        with pytest.raises(openai.APIStatusError) as raised:
            client.completions.create(model="tiny-random-qwen2", prompt=big, max_tokens=1)
        e = raised.value
        assert e.status_code == 413, f"attempt {attempt}: {e}"
        assert e.body["code"] == "request_too_large", e.body
    # The daemon still serves after the refusals.
    ok = client.completions.create(model="tiny-random-qwen2", prompt="Hello", max_tokens=1)
    assert ok.choices[0].finish_reason in ("stop", "length")
