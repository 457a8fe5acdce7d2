"""Structured outputs and tool calls as real clients drive them: the openai SDK (`parse` into
pydantic models, streamed `delta.tool_calls`, 400s naming the field), langchain-openai
(`with_structured_output` in its three methods, `bind_tools`) and litellm.

Two daemons, each a tool-call format: tiny-r1-distill-qwen2 (DeepSeek's
`<｜tool▁calls▁begin｜>`, auto-detected, and a reasoning parser: served with
`--reasoning-budget 0` so nothing is thought and the grammar starts the answer) and
tests/fixtures/hermes-qwen2 (Qwen2.5's Hermes `<tool_call>`, no reasoning).

The weights are random, so only the grammar makes an answer valid, and only a bounded schema
makes it end: every string has a maxLength, every number a range, every array a maxItems (and
objects are closed: the schemas say additionalProperties false, or the server closes objects that
list their properties, as vLLM's default backend does). Sampling is seeded: every run draws the same tokens.
"""

import json
import os
import re
from typing import Annotated, Literal

# litellm fetches its model price list from the network at import unless told not to.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import httpx
import pytest
from pydantic import BaseModel, ConfigDict, Field

openai = pytest.importorskip("openai")

# litellm's own TypedDicts, which pydantic warns about when litellm builds its first request
# (whichever test that is).
pytestmark = pytest.mark.filterwarnings("ignore:.*`ReadOnly` qualifier:UserWarning")

R1 = "tiny-r1-distill-qwen2"
SEED = 20261207
MAX_TOKENS = 300
# Parallel calls: after each call the grammar lets the model end or write another, and a random
# model writes another about as often as not (Hermes calls take ~34 tokens; 9 calls have been
# seen in one answer). Room for ~35 calls makes running out a one-in-many-thousands event.
PARALLEL_MAX_TOKENS = 1200
MESSAGES = [{"role": "user", "content": "File a ticket for my order, please."}]


# ----------------------------------------------------------------------------------------------
# the schemas: bounded, so that a random model under their grammar finishes


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sku: Literal["A1", "B2", "C3"]
    qty: int = Field(ge=1, le=9)


class Ticket(BaseModel):
    """A support ticket."""

    model_config = ConfigDict(extra="forbid")
    priority: Literal["low", "high"]
    count: int = Field(ge=0, le=99)
    urgent: bool
    code: str = Field(max_length=8)
    items: list[Item] = Field(max_length=2)  # a nested model: $defs and $ref in the schema


class GetWeather(BaseModel):
    """The weather in a city."""

    city: Literal["Paris", "Oslo", "Lima"]
    unit: Literal["c", "f"]


class LookupOrder(BaseModel):
    """An order's status."""

    order_id: int = Field(ge=0, le=999)
    express: bool


# Strict tools: the SDK's own helper adds additionalProperties false.
TOOLS = [openai.pydantic_function_tool(GetWeather, name="get_weather"),
         openai.pydantic_function_tool(LookupOrder, name="lookup_order")]
TOOL_ARGS = {"get_weather": GetWeather, "lookup_order": LookupOrder}


def set_alarm(hour: Annotated[int, Field(ge=0, le=23)], label: Literal["work", "gym"]) -> str:
    """Set an alarm for an hour of the day."""
    return f"{label} at {hour}"


def test_the_schemas_sent_are_bounded():
    # What the clients send, from the clients' own converters: a bound lost on the way (a
    # client that drops maxLength, say) would turn the tests below into max_tokens runs.
    from openai.lib._pydantic import to_strict_json_schema

    convert_to_openai_tool = pytest.importorskip("langchain_core.utils.function_calling").convert_to_openai_tool

    sdk = to_strict_json_schema(Ticket)
    assert sdk["additionalProperties"] is False and sdk["properties"]["code"]["maxLength"] == 8
    assert (sdk["properties"]["count"]["minimum"], sdk["properties"]["count"]["maximum"]) == (0, 99)
    assert sdk["$defs"]["Item"]["additionalProperties"] is False
    lc = convert_to_openai_tool(Ticket)["function"]["parameters"]
    assert lc["additionalProperties"] is False and lc["properties"]["items"]["maxItems"] == 2
    assert lc["properties"]["items"]["items"]["additionalProperties"] is False
    alarm = convert_to_openai_tool(set_alarm, strict=True)["function"]["parameters"]
    assert alarm["additionalProperties"] is False
    assert (alarm["properties"]["hour"]["minimum"], alarm["properties"]["hour"]["maximum"]) == (0, 23)
    for tool in TOOLS:
        assert tool["function"]["parameters"]["additionalProperties"] is False


# ----------------------------------------------------------------------------------------------
# fixtures and helpers


def _served_name(url):
    r = httpx.get(f"{url}/v1/models", timeout=30)
    r.raise_for_status()
    (card,) = r.json()["data"]
    return card["id"]


@pytest.fixture(scope="module")
def r1(model_daemon):
    url = model_daemon(R1, "--reasoning-budget", "0")
    assert _served_name(url) == R1
    return url, R1


@pytest.fixture(scope="module")
def hermes(model_daemon, hermes_qwen2):
    url = model_daemon(hermes_qwen2)
    name = _served_name(url)
    assert name == "hermes-qwen2"
    return url, name


@pytest.fixture(params=["r1", "hermes"])
def served(request):
    """(base url, model name) of each daemon in turn: each is started once per module."""
    return request.getfixturevalue(request.param)


def sdk(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)


def parse(client, **kw):
    """`chat.completions.parse`, or where an older SDK keeps it, `beta.chat.completions.parse`."""
    fn = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    return fn(**kw)


STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def assert_compact(text):
    """No whitespace between a JSON text's tokens (inside strings is the model's business)."""
    json.loads(text)
    assert not re.search(r"\s", STRING.sub('""', text)), text


def reasoning(message):
    return (message.model_extra or {}).get("reasoning_content")


def token_ids(url, text):
    r = httpx.post(f"{url}/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=30)
    r.raise_for_status()
    return r.json()["tokens"]


# ----------------------------------------------------------------------------------------------
# 1. the openai SDK


def test_openai_parse_into_a_pydantic_model(served):
    url, model = served
    client = sdk(url)
    seen = set()
    for seed in (SEED, SEED + 1, SEED + 2):
        r = parse(client, model=model, messages=MESSAGES, response_format=Ticket, max_tokens=MAX_TOKENS,
                  temperature=1, seed=seed)
        ch = r.choices[0]
        assert ch.finish_reason == "stop", ch.message.content
        assert isinstance(ch.message.parsed, Ticket)
        assert Ticket.model_validate_json(ch.message.content) == ch.message.parsed
        assert_compact(ch.message.content)
        assert reasoning(ch.message) is None  # --reasoning-budget 0 on r1; no parser on hermes
        assert r.usage.completion_tokens < MAX_TOKENS
        seen.add(ch.message.content)
    assert len(seen) == 3, "three seeds drew one answer: the seed (or temperature) is ignored"


def test_openai_parse_is_reproducible_with_a_seed(served):
    url, model = served
    client = sdk(url)
    a, b = (parse(client, model=model, messages=MESSAGES, response_format=Ticket, max_tokens=MAX_TOKENS,
                  temperature=1, seed=SEED).choices[0].message.parsed for _ in range(2))
    assert a == b


def test_openai_parse_after_a_thought(r1):
    # A request budget over the server's 0: the model thinks 4 tokens, the budget message
    # closes the thought, and the grammar applies from there on.
    url, model = r1
    r = parse(sdk(url), model=model, messages=MESSAGES, response_format=Ticket, max_tokens=MAX_TOKENS,
              temperature=1, seed=SEED, extra_body={"max_reasoning_tokens": 4})
    ch = r.choices[0]
    assert ch.finish_reason == "stop"
    assert reasoning(ch.message) and reasoning(ch.message).endswith("\n")
    assert r.usage.completion_tokens_details.reasoning_tokens == 5
    assert isinstance(ch.message.parsed, Ticket)
    assert Ticket.model_validate_json(ch.message.content) == ch.message.parsed


def _stream_calls(client, **kw):
    """The calls of a streamed chat, put back together from `delta.tool_calls` as a client
    does, checking OpenAI's shape on the way: a call's first delta carries its index, id,
    type and name; later ones only argument text."""
    calls, finish, content = [], None, ""
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            assert ch.index == 0
            content += ch.delta.content or ""
            for d in ch.delta.tool_calls or []:
                if d.index == len(calls):
                    assert d.id and d.type == "function" and d.function.name, d
                    calls.append({"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""})
                else:
                    assert d.index == len(calls) - 1, f"delta for call {d.index} after call {len(calls) - 1}"
                    assert d.id is None and d.type is None and d.function.name is None, d
                    calls[-1]["arguments"] += d.function.arguments or ""
            if ch.finish_reason:
                assert finish is None
                finish = ch.finish_reason
    return calls, finish, content


@pytest.mark.parametrize("parallel", [False, True])
def test_openai_streamed_tool_calls_match_the_whole_ones(served, parallel):
    url, model = served
    client = sdk(url)
    kw = dict(model=model, messages=[{"role": "user", "content": "Where is order 7, and is it raining?"}],
              tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel, max_tokens=PARALLEL_MAX_TOKENS,
              temperature=1, seed=SEED)
    whole = parse(client, **kw)
    ch = whole.choices[0]
    assert ch.finish_reason == "tool_calls"
    assert ch.message.content is None
    calls = ch.message.tool_calls
    assert len(calls) >= 1 if parallel else len(calls) == 1
    for call in calls:
        assert call.type == "function" and call.id
        assert isinstance(call.function.parsed_arguments, TOOL_ARGS[call.function.name])
        assert TOOL_ARGS[call.function.name].model_validate_json(call.function.arguments)
        assert_compact(call.function.arguments)
    assert len({c.id for c in calls}) == len(calls)

    streamed, finish, content = _stream_calls(client, **kw)
    assert finish == "tool_calls"
    assert content == ""
    assert [(c["name"], c["arguments"]) for c in streamed] == [(c.function.name, c.function.arguments)
                                                               for c in calls]
    assert len({c["id"] for c in streamed}) == len(streamed)


def test_openai_parallel_calls_are_several(served):
    # With parallel_tool_calls the grammar admits more than one call, and seeded sampling
    # reaches that: at least one of these seeds writes two or more.
    url, model = served
    counts = []
    for seed in (SEED, SEED + 1, SEED + 2):
        r = sdk(url).chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                             max_tokens=PARALLEL_MAX_TOKENS, temperature=1, seed=seed)
        assert r.choices[0].finish_reason == "tool_calls"
        counts.append(len(r.choices[0].message.tool_calls))
    assert max(counts) >= 2, counts


def test_openai_named_tool_choice_calls_that_tool(served):
    url, model = served
    client = sdk(url)
    for seed in (SEED, SEED + 1, SEED + 2):
        r = parse(client, model=model, messages=MESSAGES, tools=TOOLS, max_tokens=MAX_TOKENS, temperature=1,
                  seed=seed, tool_choice={"type": "function", "function": {"name": "get_weather"}})
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls"
        assert ch.message.tool_calls
        for call in ch.message.tool_calls:
            assert call.function.name == "get_weather"
            assert isinstance(call.function.parsed_arguments, GetWeather)


def test_openai_vllm_fields_through_extra_body(served):
    url, model = served
    client = sdk(url)
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=1,
                                          seed=SEED, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert chat.choices[0].message.content in ("yes", "no")
    assert chat.choices[0].finish_reason == "stop"
    done = client.completions.create(model=model, prompt="Order number:", max_tokens=MAX_TOKENS, temperature=1,
                                     seed=SEED, extra_body={"guided_regex": "[0-9]{3}-[A-Z]{2}"})
    assert re.fullmatch("[0-9]{3}-[A-Z]{2}", done.choices[0].text), done.choices[0].text
    assert done.choices[0].finish_reason == "stop"
    # Cut by max_tokens: "length", and what was written is a prefix of a match. (One token: r1's
    # vocabulary writes the whole match in two.)
    cut = client.completions.create(model=model, prompt="Order number:", max_tokens=1, temperature=1,
                                    seed=SEED, extra_body={"guided_regex": "[0-9]{3}-[A-Z]{2}"})
    assert cut.choices[0].finish_reason == "length"
    assert re.fullmatch("[0-9]{1,3}(-[A-Z]?)?", cut.choices[0].text), cut.choices[0].text
    assert done.choices[0].text.startswith(cut.choices[0].text)  # same seed, same first token


def _tool(name, parameters):
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


@pytest.mark.parametrize("body, param", [
    pytest.param({"response_format": {"type": "json_schema",
                                      "json_schema": {"name": "t", "schema": {"type": "frobnicate"}}}},
                 "response_format.json_schema.schema", id="unknown-type-in-schema"),
    pytest.param({"response_format": {"type": "json_schema",
                                      "json_schema": {"name": "t", "schema": {"$ref": "#/$defs/Missing"}}}},
                 "response_format.json_schema.schema", id="dangling-ref"),
    pytest.param({"response_format": {"type": "yaml"}}, "response_format.type", id="unknown-format"),
    pytest.param({"tools": [_tool("get_weather", {"type": "object"})],
                  "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
                 "tool_choice", id="unknown-named-tool"),
    pytest.param({"tools": [_tool("get_weather", {"type": "string"})], "tool_choice": "required"},
                 "tools", id="arguments-not-an-object"),
    pytest.param({"tool_choice": "required"}, "tool_choice", id="required-without-tools"),
    pytest.param({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "[a-z]+"}},
                 "guided_regex", id="two-constraints"),
    pytest.param({"extra_body": {"guided_choice": []}}, "guided_choice", id="no-choices"),
])
def test_openai_bad_constraints_are_400s_naming_the_field(r1, body, param):
    url, model = r1
    with pytest.raises(openai.BadRequestError) as e:
        sdk(url).chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, **body)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param, e.value.body


# ----------------------------------------------------------------------------------------------
# 2. langchain-openai


def chat_model(served, **kw):
    lc = pytest.importorskip("langchain_openai")
    url, model = served
    # Chat Completions, which the daemon serves, whatever langchain would pick on its own.
    return lc.ChatOpenAI(base_url=f"{url}/v1", api_key="x", model=model, max_retries=0, timeout=60,
                         temperature=1, seed=SEED, max_tokens=MAX_TOKENS, use_responses_api=False, **kw)


def test_langchain_json_schema(served):
    out = chat_model(served).with_structured_output(Ticket, method="json_schema", include_raw=True).invoke(
        "File a ticket for my order, please.")
    assert out["parsing_error"] is None
    assert isinstance(out["parsed"], Ticket)
    assert out["raw"].response_metadata["finish_reason"] == "stop"
    assert Ticket.model_validate_json(out["raw"].content) == out["parsed"]


def test_langchain_json_mode(served):
    # json_object admits any object, whose keys a random model never ends: a real OpenAI
    # parameter, logit_bias, makes it close the object at once ("{}" is one token here; "}"
    # is favoured too in case it were two). Set on the model: `.bind(logit_bias=…)` before
    # `.with_structured_output` is dropped by langchain (it rebinds the bare model).
    url, _ = served
    bias = {t: 100 for t in {*token_ids(url, "{}"), *token_ids(url, "}")}}
    schema = {"title": "anything", "description": "Any JSON object.", "type": "object"}
    out = chat_model(served, logit_bias=bias).with_structured_output(
        schema, method="json_mode", include_raw=True).invoke("Reply in JSON.")
    assert out["parsing_error"] is None
    assert out["parsed"] == {}
    assert out["raw"].content == "{}"
    assert out["raw"].response_metadata["finish_reason"] == "stop"


def test_langchain_function_calling(served):
    # A named tool_choice with parallel_tool_calls false, parsed by langchain's PydanticToolsParser.
    out = chat_model(served).with_structured_output(Ticket, method="function_calling", include_raw=True).invoke(
        "File a ticket for my order, please.")
    assert out["parsing_error"] is None
    assert isinstance(out["parsed"], Ticket)
    raw = out["raw"]
    assert raw.response_metadata["finish_reason"] == "tool_calls"
    assert [c["name"] for c in raw.tool_calls] == ["Ticket"]
    assert Ticket.model_validate(raw.tool_calls[0]["args"]) == out["parsed"]


@pytest.mark.parametrize("strict", [True, None], ids=["strict", "default"])
def test_langchain_bind_tools_required(served, strict):
    from langchain_core.tools import tool

    alarm = tool(set_alarm)
    # strict=True: langchain sends additionalProperties false; by default it sends none, and the
    # server closes objects that list their properties (as vLLM's default backend does), so the
    # random model cannot wander into keys of its own.
    msg = chat_model(served).bind_tools([alarm, GetWeather], tool_choice="required", strict=strict).invoke(
        "Wake me at seven for the gym.")
    assert msg.response_metadata["finish_reason"] == "tool_calls"
    assert msg.tool_calls
    assert not msg.invalid_tool_calls
    for call in msg.tool_calls:
        assert call["id"] and call["type"] == "tool_call"
        if call["name"] == "set_alarm":
            args = alarm.args_schema.model_validate(call["args"])
            assert 0 <= args.hour <= 23 and args.label in ("work", "gym")
            assert alarm.invoke(call["args"]) == set_alarm(**call["args"])
        else:
            assert call["name"] == "GetWeather", call
            GetWeather.model_validate(call["args"])


# ----------------------------------------------------------------------------------------------
# 3. litellm


@pytest.fixture(scope="module")
def litellm():
    module = pytest.importorskip("litellm")
    if hasattr(module, "telemetry"):
        module.telemetry = False
    return module


def _litellm(litellm, served, **kw):
    url, model = served
    return litellm.completion(model=f"openai/{model}", api_base=f"{url}/v1", api_key="x", messages=MESSAGES,
                              max_tokens=MAX_TOKENS, temperature=1, seed=SEED, timeout=60, num_retries=0, **kw)


@pytest.mark.parametrize("form", ["pydantic", "json_schema"])
def test_litellm_response_format(litellm, served, form):
    fmt = Ticket if form == "pydantic" else {
        "type": "json_schema",
        "json_schema": {"name": "Ticket", "schema": Ticket.model_json_schema(), "strict": True},
    }
    r = _litellm(litellm, served, response_format=fmt)
    ch = r.choices[0]
    assert ch.finish_reason == "stop"
    ticket = Ticket.model_validate_json(ch.message.content)
    assert_compact(ch.message.content)
    # Both forms send the same constraint: the same seed draws the same ticket.
    assert ticket == parse(sdk(served[0]), model=served[1], messages=MESSAGES, response_format=Ticket,
                           max_tokens=MAX_TOKENS, temperature=1, seed=SEED).choices[0].message.parsed


def test_litellm_tool_calls(litellm, served):
    r = _litellm(litellm, served, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "lookup_order"}})
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    assert ch.message.tool_calls
    for call in ch.message.tool_calls:
        assert call.function.name == "lookup_order"
        LookupOrder.model_validate_json(call.function.arguments)
