"""The fidelity fixes as the clients people already use meet them: the openai SDK (models,
echo with prompt logprobs, continuous usage, refused fields), litellm and langchain-openai
(logprobs through their own response shapes, and a clear 400 rather than a silent 200 for what
is not implemented yet)."""

import pytest

openai = pytest.importorskip("openai")

MODEL = "tiny-random-qwen2"


@pytest.fixture(scope="module")
def url(model_daemon):
    return model_daemon(MODEL)


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def test_models_retrieve_and_a_missing_model(client):
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.status_code == 404


def test_echo_with_logprobs_scores_the_prompt(client):
    prompt = [9707, 1879, 11, 419, 374]
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(prompt) + 1
    assert lp.token_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset)
    # The sampled token is always among its top logprobs.
    for tok, own, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[tok] == own


def test_unsupported_fields_are_a_400_naming_them(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", suffix="y", max_tokens=1)
    assert e.value.body["param"] == "suffix"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x"}},
        )
    assert e.value.body["param"] == "response_format.json_schema.schema"
    # Informational fields the SDK sends are accepted.
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        user="u-1",
        metadata={"team": "support"},
        store=False,
    )
    assert r.choices[0].finish_reason in ("stop", "length")


def test_continuous_usage_through_the_sdk_stream(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    )
    chunks = list(stream)
    assert chunks and all(c.usage is not None for c in chunks)
    assert len({c.created for c in chunks}) == 1


def test_litellm_logprobs_and_a_refused_format(url):
    litellm = pytest.importorskip("litellm")
    r = litellm.completion(
        model=f"openai/{MODEL}",
        api_base=url + "/v1",
        api_key="x",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs["content"]
    assert content and all(isinstance(e["bytes"], list) for e in content)
    with pytest.raises(litellm.BadRequestError) as e:
        litellm.completion(
            model=f"openai/{MODEL}",
            api_base=url + "/v1",
            api_key="x",
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x"}},
            num_retries=0,
        )
    assert "response_format" in str(e.value)


def test_langchain_logprobs_and_tools_refused(url):
    lc = pytest.importorskip("langchain_openai")
    llm = lc.ChatOpenAI(
        model=MODEL, base_url=url + "/v1", api_key="x", max_tokens=3, max_retries=0,
        logprobs=True, top_logprobs=1,
    )
    msg = llm.invoke("hi")
    lp = msg.response_metadata["logprobs"]["content"]
    assert lp and all(e["logprob"] <= 0 for e in lp)

    def lookup(order_id: str) -> str:
        """Look an order up."""
        return order_id

    with pytest.raises(openai.BadRequestError) as e:
        llm.bind_tools([lookup]).invoke("where is order 7?")
    assert e.value.body["param"] in ("tools", "tool_choice")
