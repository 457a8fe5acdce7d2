// Drives a running Distillery daemon with the official `openai` npm package.
//
//   node tests/js/check.mjs BASE_URL CASE [MODEL]
//
// BASE_URL is the daemon's root (http://127.0.0.1:PORT, no /v1); CASE is one of the keys of
// CASES below; MODEL is the served model's id (default: the only one /v1/models lists).
// Every check of the case runs, each printed as PASS or FAIL; the exit status is 0 only when
// all passed (1: a check failed, 2: bad arguments).

import OpenAI from "openai";
import { VERSION } from "openai/version";
import assert from "node:assert/strict";

const PROMPT = "The quick brown fox jumps over the lazy dog because";
const MESSAGES = [{ role: "user", content: "Tell me a short story about a fox." }];

// ---------------------------------------------------------------------------------------------
// Helpers

/** Runs `fn` and returns the error it throws; fails when it resolves instead. */
async function rejects(what, fn) {
  let value;
  try {
    value = await fn();
  } catch (e) {
    return e;
  }
  throw new assert.AssertionError({
    message: `${what}: expected an error, but the request succeeded with ${brief(value)}`,
  });
}

/** Asserts `err` is the SDK's `cls` with HTTP `status` and an OpenAI error envelope. */
function expectApiError(err, cls, status, what) {
  if (!(err instanceof OpenAI.APIError)) {
    throw new assert.AssertionError({
      message: `${what}: expected OpenAI.${cls.name}, got a non-API error: ${err?.stack ?? err}`,
    });
  }
  assert.ok(
    err instanceof cls,
    `${what}: expected OpenAI.${cls.name}, got ${err.constructor.name} (status ${err.status}): ${err.message}`,
  );
  eq(err.status, status, `${what}: status`);
  assert.ok(
    err.error && typeof err.error === "object" && typeof err.error.message === "string",
    `${what}: the body has no OpenAI error envelope {"error": {"message", ...}}; err.error = ${brief(err.error)}`,
  );
}

function brief(v) {
  let s;
  try {
    s = JSON.stringify(v);
  } catch {
    s = String(v);
  }
  if (s === undefined) s = String(v);
  return s.length > 600 ? `${s.slice(0, 600)}...` : s;
}

function eq(actual, expected, what) {
  if (!Object.is(actual, expected)) {
    throw new assert.AssertionError({
      message: `${what}: expected ${brief(expected)}, got ${brief(actual)}`,
    });
  }
}

function deepEq(actual, expected, what) {
  try {
    assert.deepStrictEqual(actual, expected);
  } catch {
    throw new assert.AssertionError({
      message: `${what}: expected ${brief(expected)}, got ${brief(actual)}`,
    });
  }
}

function isByteArray(b) {
  return Array.isArray(b) && b.every((x) => Number.isInteger(x) && x >= 0 && x <= 255);
}

function isLogprob(x) {
  return typeof x === "number" && Number.isFinite(x) && x <= 1e-6;
}

function assertNondecreasing(xs, what) {
  for (let i = 1; i < xs.length; i++) {
    assert.ok(xs[i] >= xs[i - 1], `${what} decreases at index ${i}: ${brief(xs)}`);
  }
}

async function collectStream(stream) {
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  return chunks;
}

// ---------------------------------------------------------------------------------------------
// Cases: each a list of [name, async (client, model) => void].

const CASES = {
  models: [
    ["models.list returns the served model", async (client, model) => {
      const ids = [];
      for await (const m of client.models.list()) ids.push(m.id);
      assert.ok(ids.includes(model), `models.list() ids ${brief(ids)} lack ${model}`);
    }],
    ["models.retrieve(id) returns the model card", async (client, model) => {
      const m = await client.models.retrieve(model);
      eq(m.id, model, "id");
      eq(m.object, "model", "object");
      eq(typeof m.owned_by, "string", `owned_by: ${brief(m)}`);
      assert.ok(m.owned_by.length > 0, "owned_by is empty");
      assert.ok(Number.isInteger(m.max_model_len) && m.max_model_len > 0,
        `max_model_len: ${brief(m)}`);
      let listed;
      for await (const x of client.models.list()) if (x.id === model) listed = x;
      assert.ok(listed, "not in models.list()");
      for (const k of ["owned_by", "max_model_len", "created"]) {
        deepEq(m[k], listed[k], `retrieve().${k} differs from models.list()'s`);
      }
    }],
    ["models.retrieve('no-such-model') throws NotFoundError (model_not_found)", async (client) => {
      const err = await rejects("models.retrieve('no-such-model')",
        () => client.models.retrieve("no-such-model"));
      expectApiError(err, OpenAI.NotFoundError, 404, "models.retrieve('no-such-model')");
      eq(err.code, "model_not_found",
        `error.code (the envelope was ${brief(err.error)})`);
    }],
  ],

  chat: [
    ["non-streaming chat completion", async (client, model) => {
      const r = await client.chat.completions.create({
        model, messages: MESSAGES, max_tokens: 8, temperature: 0,
      });
      eq(r.object, "chat.completion", "object");
      eq(r.choices.length, 1, "choices");
      const c = r.choices[0];
      eq(c.message.role, "assistant", "role");
      eq(typeof c.message.content, "string", `content: ${brief(c.message)}`);
      assert.ok(["stop", "length"].includes(c.finish_reason), `finish_reason ${c.finish_reason}`);
      assert.ok(r.usage, "no usage");
      assert.ok(r.usage.prompt_tokens > 0, `usage.prompt_tokens: ${brief(r.usage)}`);
      assert.ok(r.usage.completion_tokens > 0 && r.usage.completion_tokens <= 8,
        `usage.completion_tokens: ${brief(r.usage)}`);
      eq(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens,
        "usage.total_tokens");
    }],
    ["chat logprobs with top_logprobs 2", async (client, model) => {
      const r = await client.chat.completions.create({
        model, messages: MESSAGES, max_tokens: 8, temperature: 0, logprobs: true, top_logprobs: 2,
      });
      const content = r.choices[0].logprobs?.content;
      assert.ok(Array.isArray(content) && content.length > 0,
        `choices[0].logprobs.content: ${brief(r.choices[0].logprobs)}`);
      assert.ok(content.length <= r.usage.completion_tokens,
        `${content.length} logprob entries for ${r.usage.completion_tokens} completion tokens`);
      content.forEach((e, i) => {
        const at = `logprobs.content[${i}] = ${brief(e)}`;
        eq(typeof e.token, "string", `token: ${at}`);
        assert.ok(isLogprob(e.logprob), `logprob: ${at}`);
        assert.ok(isByteArray(e.bytes), `bytes is not an array of byte values: ${at}`);
        assert.ok(Array.isArray(e.top_logprobs), `top_logprobs: ${at}`);
        assert.ok(e.top_logprobs.length >= 1 && e.top_logprobs.length <= 3,
          `top_logprobs length ${e.top_logprobs.length}: ${at}`);
        for (const t of e.top_logprobs) {
          eq(typeof t.token, "string", `top token: ${at}`);
          assert.ok(isLogprob(t.logprob), `top logprob: ${at}`);
          assert.ok(isByteArray(t.bytes), `top bytes: ${at}`);
        }
        assert.ok(
          e.top_logprobs.some((t) => t.token === e.token && brief(t.bytes) === brief(e.bytes)),
          `the sampled token is not among its top_logprobs: ${at}`,
        );
      });
    }],
  ],

  stream: [
    ["streamed deltas equal the non-streaming greedy answer; usage last; one created/id",
      async (client, model) => {
        const req = { model, messages: MESSAGES, max_tokens: 16, temperature: 0, seed: 7 };
        const whole = await client.chat.completions.create(req);
        const chunks = await collectStream(await client.chat.completions.create({
          ...req, stream: true, stream_options: { include_usage: true },
        }));
        assert.ok(chunks.length >= 2, `only ${chunks.length} chunks`);
        let text = "";
        const roles = [];
        let finish = null;
        for (const ch of chunks) {
          eq(ch.object, "chat.completion.chunk", `object: ${brief(ch)}`);
          for (const c of ch.choices) {
            if (c.delta?.role) roles.push(c.delta.role);
            text += c.delta?.content ?? "";
            if (c.finish_reason) finish = c.finish_reason;
          }
        }
        deepEq(roles, ["assistant"], "delta roles");
        eq(text, whole.choices[0].message.content,
          "concatenated stream deltas vs the non-streaming answer");
        eq(finish, whole.choices[0].finish_reason, "finish_reason");
        const last = chunks[chunks.length - 1];
        assert.ok(last.usage, `the final chunk has no usage: ${brief(last)}`);
        deepEq(last.choices, [], "the usage chunk's choices");
        deepEq(
          [last.usage.prompt_tokens, last.usage.completion_tokens],
          [whole.usage.prompt_tokens, whole.usage.completion_tokens],
          "streamed usage vs non-streaming usage",
        );
        for (const ch of chunks.slice(0, -1)) {
          assert.ok(ch.usage == null, `include_usage alone: a chunk before the last carries usage: ${brief(ch)}`);
        }
        const created = new Set(chunks.map((c) => c.created));
        eq(created.size, 1, `chunks' created values: ${brief([...created])}`);
        const ids = new Set(chunks.map((c) => c.id));
        eq(ids.size, 1, `chunks' id values: ${brief([...ids])}`);
      }],
    ["continuous_usage_stats: every chunk with choices carries usage", async (client, model) => {
      const chunks = await collectStream(await client.chat.completions.create({
        model, messages: MESSAGES, max_tokens: 8, temperature: 0, seed: 7, stream: true,
        stream_options: { include_usage: true, continuous_usage_stats: true },
      }));
      const withChoices = chunks.filter((c) => c.choices.length > 0);
      assert.ok(withChoices.length > 0, "no chunk with choices");
      const missing = withChoices.filter((c) => c.usage == null);
      assert.ok(missing.length === 0,
        `${missing.length} of ${withChoices.length} chunks with choices lack usage; first: ${brief(missing[0])}`);
      const last = chunks[chunks.length - 1];
      assert.ok(last.usage, `the final chunk has no usage: ${brief(last)}`);
      const completion = withChoices.map((c) => c.usage.completion_tokens);
      assertNondecreasing(completion, "usage.completion_tokens over the chunks");
      for (const c of withChoices) {
        eq(c.usage.prompt_tokens, last.usage.prompt_tokens,
          `a chunk's usage.prompt_tokens: ${brief(c.usage)}`);
        assert.ok(c.usage.completion_tokens <= last.usage.completion_tokens,
          `a chunk's usage.completion_tokens exceeds the final one: ${brief(c.usage)}`);
      }
    }],
  ],

  completions: [
    ["completion with logprobs 2, echo false", async (client, model) => {
      const r = await client.completions.create({
        model, prompt: PROMPT, max_tokens: 8, temperature: 0, logprobs: 2, echo: false,
      });
      eq(r.object, "text_completion", "object");
      const c = r.choices[0];
      eq(typeof c.text, "string", "text");
      assert.ok(["stop", "length"].includes(c.finish_reason), `finish_reason ${c.finish_reason}`);
      assert.ok(r.usage.prompt_tokens > 0, `usage: ${brief(r.usage)}`);
      assert.ok(r.usage.completion_tokens > 0 && r.usage.completion_tokens <= 8,
        `usage: ${brief(r.usage)}`);
      const lp = c.logprobs;
      assert.ok(lp, "no logprobs");
      const n = lp.tokens?.length;
      assert.ok(n > 0 && n <= r.usage.completion_tokens,
        `${n} logprob tokens for ${r.usage.completion_tokens} completion tokens`);
      for (const k of ["token_logprobs", "top_logprobs", "text_offset"]) {
        eq(lp[k]?.length, n, `logprobs.${k} length vs tokens: ${brief(lp)}`);
      }
      assert.ok(lp.tokens.every((t) => typeof t === "string"), "tokens");
      assert.ok(lp.token_logprobs.every(isLogprob), `token_logprobs: ${brief(lp.token_logprobs)}`);
      lp.top_logprobs.forEach((t, i) => {
        assert.ok(t && typeof t === "object", `top_logprobs[${i}]: ${brief(t)}`);
        const ks = Object.keys(t);
        assert.ok(ks.length >= 1 && ks.length <= 3, `top_logprobs[${i}] has ${ks.length} entries`);
        assert.ok(Object.values(t).every(isLogprob), `top_logprobs[${i}]: ${brief(t)}`);
      });
      assertNondecreasing(lp.text_offset, "text_offset");
    }],
    ["echo: true, logprobs 1, max_tokens 1 covers prompt + completion", async (client, model) => {
      const r = await client.completions.create({
        model, prompt: PROMPT, max_tokens: 1, temperature: 0, logprobs: 1, echo: true,
      });
      const c = r.choices[0];
      assert.ok(c.text.startsWith(PROMPT), `text does not start with the prompt: ${brief(c.text)}`);
      const lp = c.logprobs;
      assert.ok(lp, "no logprobs");
      const want = r.usage.prompt_tokens + r.usage.completion_tokens;
      eq(lp.tokens?.length, want,
        `logprobs.tokens covers ${lp.tokens?.length} tokens, prompt + completion is ${want} `
        + `(${brief(r.usage)}); tokens: ${brief(lp.tokens)}`);
      for (const k of ["token_logprobs", "top_logprobs", "text_offset"]) {
        eq(lp[k]?.length, want, `logprobs.${k} length: ${brief(lp)}`);
      }
      eq(lp.token_logprobs[0], null,
        `token_logprobs[0] (the first prompt token has no logprob): ${brief(lp.token_logprobs)}`);
      assert.ok(lp.token_logprobs.slice(1).every(isLogprob),
        `token_logprobs[1..]: ${brief(lp.token_logprobs)}`);
      eq(lp.text_offset[0], 0, `text_offset[0]: ${brief(lp.text_offset)}`);
      assertNondecreasing(lp.text_offset, "text_offset");
    }],
  ],

  errors: [
    ["completions with suffix -> BadRequestError, param 'suffix'", async (client, model) => {
      const err = await rejects("completions.create({suffix: 'x'})",
        () => client.completions.create({ model, prompt: PROMPT, max_tokens: 1, suffix: "x" }));
      expectApiError(err, OpenAI.BadRequestError, 400, "suffix");
      eq(err.param, "suffix", `error.param (envelope ${brief(err.error)})`);
    }],
    ["chat top_logprobs without logprobs -> BadRequestError, param 'top_logprobs'",
      async (client, model) => {
        const err = await rejects("chat top_logprobs without logprobs",
          () => client.chat.completions.create({
            model, messages: MESSAGES, max_tokens: 1, top_logprobs: 2,
          }));
        expectApiError(err, OpenAI.BadRequestError, 400, "top_logprobs");
        eq(err.param, "top_logprobs", `error.param (envelope ${brief(err.error)})`);
      }],
    ["unknown model -> NotFoundError (chat and completions)", async (client) => {
      for (const [what, call] of [
        ["chat", (c) => c.chat.completions.create({ model: "no-such-model", messages: MESSAGES, max_tokens: 1 })],
        ["completions", (c) => c.completions.create({ model: "no-such-model", prompt: PROMPT, max_tokens: 1 })],
      ]) {
        const err = await rejects(`${what} with model 'no-such-model'`, () => call(client));
        expectApiError(err, OpenAI.NotFoundError, 404, `${what} unknown model`);
        eq(err.code, "model_not_found", `${what}: error.code (envelope ${brief(err.error)})`);
        eq(err.param, "model", `${what}: error.param (envelope ${brief(err.error)})`);
      }
    }],
  ],
};

// ---------------------------------------------------------------------------------------------

async function main() {
  const [url, caseName, modelArg] = process.argv.slice(2);
  if (!url || !caseName || !(caseName in CASES)) {
    console.error(`usage: node check.mjs BASE_URL CASE [MODEL]; CASE is one of ${Object.keys(CASES).join(", ")}`);
    return 2;
  }
  const client = new OpenAI({
    baseURL: `${url.replace(/\/+$/, "")}/v1`,
    apiKey: "x",
    maxRetries: 0,
    timeout: 60_000,
  });
  console.log(`openai ${VERSION} on node ${process.version}; ${url}; case ${caseName}`);

  let model = modelArg;
  if (!model) {
    const ids = [];
    try {
      for await (const m of client.models.list()) ids.push(m.id);
    } catch (e) {
      console.error(`FAIL: models.list() to find the served model: ${e?.stack ?? e}`);
      return 1;
    }
    if (ids.length !== 1) {
      console.error(`FAIL: expected one served model, models.list() gave ${brief(ids)}; pass MODEL`);
      return 1;
    }
    model = ids[0];
  }

  const failed = [];
  for (const [name, fn] of CASES[caseName]) {
    try {
      await fn(client, model);
      console.log(`PASS  ${caseName}: ${name}`);
    } catch (e) {
      failed.push(name);
      const msg = e instanceof assert.AssertionError ? e.message
        : e instanceof OpenAI.APIError
          ? `unexpected ${e.constructor.name} (status ${e.status}): ${e.message}; body ${brief(e.error)}`
          : (e?.stack ?? String(e));
      console.log(`FAIL  ${caseName}: ${name}\n      ${msg.replace(/\n/g, "\n      ")}`);
    }
  }
  if (failed.length) {
    console.error(`${failed.length} of ${CASES[caseName].length} checks of case '${caseName}' failed: ${failed.join("; ")}`);
    return 1;
  }
  console.log(`all ${CASES[caseName].length} checks of case '${caseName}' passed`);
  return 0;
}

process.exitCode = await main();
