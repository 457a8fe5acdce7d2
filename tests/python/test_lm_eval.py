"""lm-evaluation-harness (PyPI `lm-eval`) scoring the daemon through its `local-completions`
model, as people benchmark a vLLM server: `lm_eval run --model local-completions` on the three
log-likelihood task kinds of tests/python/lm_eval_tasks (loglikelihood, multiple_choice,
loglikelihood_rolling), once with the daemon's own tokenizer endpoints
(`tokenizer_backend=remote`: GET /tokenizer_info, POST /tokenize, POST /detokenize) and once with
the model folder's tokenizer loaded by transformers (`tokenizer_backend=huggingface`).

What lm-eval sends for every log-likelihood request (lm_eval 0.4.13, openai_completions.py):
POST /v1/completions {"model", "prompt": [[ids of context + continuation]], "temperature": 0,
"max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": true}; it then takes
choices[i].logprobs.token_logprobs[ctxlen:-1] (the prompt's continuation tokens; the last entry
is the one generated token) and is_greedy = every such logprob equals max(top_logprobs[k]).

Every number lm-eval reports is checked against the daemon's decode path, which lm-eval does not
use: the logprob of continuation token t after prefix p is what the daemon reports for the one
token it generates from prompt p when logit_bias {t: +100} forces t (logprobs are vLLM's "raw"
ones, taken before biases, so forcing does not change them). A daemon that ignores `echo`
logprobs gives lm-eval empty slices: log-likelihood 0, every continuation "greedy", acc 1.0 and
perplexity 1.0 on random weights.

Needs `pip install "lm-eval[api]" transformers` (no torch: neither the API models nor
transformers' tokenizers import it). lm-eval runs as a subprocess with the hub switched off.
"""

import importlib.util
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import httpx
import pytest

MODEL = "tiny-llama-v512"  # 512 ids, 2 x 64: fast, and a real byte-level BPE tokenizer
MODEL_DIR = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "models" / MODEL
TASKS_DIR = pathlib.Path(__file__).resolve().parent / "lm_eval_tasks"
TASKS = ["distillery_ll", "distillery_mc", "distillery_rolling"]
# The task yamls name their jsonl files relative to the repository root; the copies lm-eval
# reads get absolute paths, so neither lm-eval's nor pytest's working folder matters.
REPO_RELATIVE_TASKS = "tests/python/lm_eval_tasks/"
# Per-token tolerance between lm-eval's (echo) logprobs and the decode path's.
TOL_PER_TOKEN = 1e-4
BACKENDS = ["remote", "huggingface"]


def _require_lm_eval():
    missing = [m for m in ("lm_eval", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        msg = f"{missing} not installed: pip install 'lm-eval[api]' transformers"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(f"!!! SKIPPING: {msg} !!!")


# ----------------------------------------------------------------------------------------------
# the daemon, and what it says outside lm-eval's path


@pytest.fixture(scope="module")
def server(model_daemon):
    _require_lm_eval()
    if not MODEL_DIR.is_dir():
        pytest.skip(f"!!! SKIPPING: {MODEL_DIR} not found !!!")
    url = model_daemon(MODEL)
    http = httpx.Client(base_url=url, timeout=120)
    model = http.get("/v1/models").json()["data"][0]["id"]
    yield Daemon(url, model, http)
    http.close()


class Daemon:
    def __init__(self, url, model, http):
        self.url, self.model, self.http = url, model, http
        self._forced = {}

    def post(self, path, body):
        r = self.http.post(path, json=body)
        assert r.status_code == 200, f"{path} {body} -> {r.status_code} {r.text}"
        return r.json()

    def tokenize(self, text):
        """What lm-eval's RemoteTokenizer.encode sends and reads."""
        return self.post("/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"]

    def forced(self, prefix, token):
        """(logprob of `token` after `prefix`, the top-1 logprob there), from the decode path:
        one token generated with logit_bias forcing `token`."""
        key = (tuple(prefix), token)
        if key not in self._forced:
            body = {
                "model": self.model, "prompt": list(prefix), "max_tokens": 1,
                "temperature": 0, "logprobs": 1, "logit_bias": {str(token): 100},
            }
            choice = self.post("/v1/completions", body)["choices"][0]
            lp = choice["logprobs"]
            assert len(lp["token_logprobs"]) == 1, f"no echo was asked for: {lp}"
            want = self.detokenize([token])
            assert choice["text"] == want, f"logit_bias +100 did not force {token} ({want!r}): {choice}"
            self._forced[key] = (lp["token_logprobs"][0], max(lp["top_logprobs"][0].values()))
        return self._forced[key]

    def detokenize(self, ids):
        return self.post("/detokenize", {"tokens": ids})["prompt"]

    def continuation(self, prefix, tokens):
        """(sum of logprobs of `tokens` after `prefix`, whether each was the top-1 token,
        whether some token was within 1e-3 of the top without being it: greedy undecidable)."""
        total, greedy, near_tie = 0.0, True, False
        for i, t in enumerate(tokens):
            lp, top = self.forced(list(prefix) + list(tokens[:i]), t)
            total += lp
            if lp < top:
                greedy = False
                near_tie |= top - lp < 1e-3
        return total, greedy, near_tie


class Tokenizers:
    """The token ids and prefix token lm-eval uses with one tokenizer backend, computed the way
    lm-eval does (TemplateLM._encode_pair, TemplateAPI.prefix_token_id)."""

    def __init__(self, backend, daemon):
        if backend == "remote":
            self.encode = daemon.tokenize
            info = daemon.http.get("/tokenizer_info").json()
            bos, eos = info.get("bos_token"), info.get("eos_token")
            bos_id = self.encode(bos)[0] if bos is not None else None
            eos_id = self.encode(eos)[0] if eos is not None else None
            # lm-eval: `bos_token_id or eos_token_id`, so a BOS of id 0 (this model's) gives EOS.
            self.prefix = bos_id or eos_id
        else:
            import transformers

            tok = transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))
            self.encode = lambda s: tok(s, add_special_tokens=False).input_ids
            self.prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def pair(self, context, continuation):
        if context == "":
            cont = self.encode(continuation)
            if cont[0] != self.prefix:
                return [self.prefix], cont
            return cont[:1], cont[1:]
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]


# ----------------------------------------------------------------------------------------------
# lm-eval itself


def _task_dir(dest):
    dest.mkdir(parents=True, exist_ok=True)
    for y in TASKS_DIR.glob("*.yaml"):
        text = y.read_text().replace(REPO_RELATIVE_TASKS, f"{TASKS_DIR}/")
        (dest / y.name).write_text(text)
    return dest


def run_lm_eval(daemon, backend, work):
    """`python -m lm_eval run` against the daemon: (results json, {task: [sample, ...]})."""
    args = {
        "base_url": f"{daemon.url}/v1/completions",
        "model": daemon.model,
        "tokenizer_backend": backend,
        "max_retries": 1,
    }
    if backend == "huggingface":
        # Also the batched (prompt: [[...], [...]]) and concurrent (aiohttp) request paths.
        args.update(tokenizer=str(MODEL_DIR), num_concurrent=2)
    out = work / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "HF_"))}
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(work / "hf"), HF_DATASETS_CACHE=str(work / "hf" / "datasets"),
        TOKENIZERS_PARALLELISM="false", NO_COLOR="1",
    )
    cmd = [
        sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
        "--model_args", ",".join(f"{k}={v}" for k, v in args.items()),
        "--tasks", *TASKS, "--include_path", str(_task_dir(work / "tasks")),
        "--log_samples", "--output_path", str(out), "--seed", "0",
        "--batch_size", "2" if backend == "huggingface" else "1",
    ]
    p = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"lm_eval exited {p.returncode}:\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}"
    [results] = out.rglob("results_*.json")
    samples = {}
    for task in TASKS:
        [f] = out.rglob(f"samples_{task}_*.jsonl")
        samples[task] = sorted(
            (json.loads(line) for line in f.read_text().splitlines() if line.strip()),
            key=lambda s: s["doc_id"],
        )
    return json.loads(results.read_text()), samples


@pytest.fixture(scope="module")
def lm_eval_runs(server, tmp_path_factory):
    runs = {}

    def get(backend):
        if backend not in runs:
            runs[backend] = run_lm_eval(server, backend, tmp_path_factory.mktemp(f"lm_eval_{backend}"))
        return runs[backend]

    return get


def _ll(resp):
    """One logged loglikelihood response: ["<float>", "<bool>"] (lm-eval logs str())."""
    return float(resp[0]), resp[1] == "True"


def _metric(results, task, name):
    return results["results"][task][f"{name},none"]


# ----------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_weights_do_not_score_perfectly(lm_eval_runs, backend):
    """The symptom of prompt logprobs that lm-eval cannot read: every continuation is
    'greedy' with log-likelihood 0."""
    results, samples = lm_eval_runs(backend)
    assert _metric(results, "distillery_ll", "acc") < 1.0
    assert _metric(results, "distillery_ll", "perplexity") > 1.0
    assert _metric(results, "distillery_rolling", "word_perplexity") > 1.0
    assert _metric(results, "distillery_rolling", "byte_perplexity") > 1.0
    assert _metric(results, "distillery_rolling", "bits_per_byte") > 0.0
    for task in TASKS:
        for s in samples[task]:
            for resp in s["resps"]:
                assert float(resp[0] if task == "distillery_rolling" else resp[0][0]) < 0.0, (task, s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loglikelihoods_match_the_decode_path(server, lm_eval_runs, backend):
    """Each log-likelihood lm-eval computed (from echoed prompt logprobs) equals the sum of
    the daemon's decode-path logprobs of the same tokens, and is_greedy agrees."""
    results, samples = lm_eval_runs(backend)
    toks = Tokenizers(backend, server)

    # loglikelihood: one request per doc
    lls, greedy = [], []
    for s in samples["distillery_ll"]:
        [[resp]] = s["resps"]
        got, got_greedy = _ll(resp)
        ctx, cont = toks.pair(s["arguments"]["gen_args_0"]["arg_0"], s["arguments"]["gen_args_0"]["arg_1"])
        want, want_greedy, near_tie = server.continuation(ctx, cont)
        assert abs(got - want) <= TOL_PER_TOKEN * len(cont), (s["doc"], ctx, cont, got, want)
        if not near_tie:
            assert got_greedy == want_greedy, (s["doc"], got_greedy, want_greedy)
        lls.append(want)
        greedy.append(got_greedy)
    assert len(lls) == 5
    assert _metric(results, "distillery_ll", "acc") == pytest.approx(sum(greedy) / len(greedy))
    assert _metric(results, "distillery_ll", "perplexity") == pytest.approx(
        math.exp(-sum(lls) / len(lls)), rel=1e-3)

    # multiple_choice: one loglikelihood request per choice, acc = argmax is the label
    correct = []
    for s in samples["distillery_mc"]:
        wants = []
        for args, [resp] in zip(s["arguments"].values(), s["resps"]):
            got, _ = _ll(resp)
            ctx, cont = toks.pair(args["arg_0"], args["arg_1"])
            want, _, _ = server.continuation(ctx, cont)
            assert abs(got - want) <= TOL_PER_TOKEN * len(cont), (s["doc"], args, got, want)
            wants.append(want)
        assert len(wants) == len(s["doc"]["choices"])
        correct.append(max(range(len(wants)), key=wants.__getitem__) == s["doc"]["label"])
        assert s["acc"] == float(correct[-1])
    assert len(correct) == 5
    assert _metric(results, "distillery_mc", "acc") == pytest.approx(sum(correct) / len(correct))

    # loglikelihood_rolling: the whole text, its first token after the prefix token
    total_ll, words = 0.0, 0
    for s in samples["distillery_rolling"]:
        [resp] = s["resps"]
        got = float(resp[0])
        text = s["arguments"]["gen_args_0"]["arg_0"]
        ids = toks.encode(text)
        assert len(ids) < 2000  # one window
        want, _, _ = server.continuation([toks.prefix], ids)
        assert abs(got - want) <= TOL_PER_TOKEN * len(ids), (text, ids, got, want)
        total_ll += want
        words += len(text.split())
    assert len(samples["distillery_rolling"]) == 5
    assert _metric(results, "distillery_rolling", "word_perplexity") == pytest.approx(
        math.exp(-total_ll / words), rel=1e-3)


def test_tokenizer_backends_agree(server):
    """The daemon's /tokenize equals transformers' tokenizer on the tasks' texts, so the two
    lm-eval runs score the same token ids (the rolling task's prefix token aside: lm-eval's
    remote backend takes EOS where BOS has id 0)."""
    _require_lm_eval()
    hf = Tokenizers("huggingface", server)
    texts = []
    for f in TASKS_DIR.glob("*.jsonl"):
        for line in f.read_text().splitlines():
            doc = json.loads(line)
            texts += [v for v in doc.values() if isinstance(v, str)]
            texts += doc.get("choices", [])
    texts += ["Question: Where do fish live?\nAnswer: in water", "</s>", "<s>"]
    for t in texts:
        assert server.tokenize(t) == hf.encode(t), t
