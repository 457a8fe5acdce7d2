#!/usr/bin/env python3
"""The multi-tenant prefix-cache workload behind a router (issue: router worker endpoints).

Three replicas of tiny-llama-v512, each with a 100-block KV cache (block size 8: 800 tokens,
room for about seven of the eight tenants' system prompts), behind vllm-router or the SGLang
gateway with one policy; 8 tenants, each with its own ~110-token system prompt, ask 30
questions each, shuffled (seeded) and sent by 16 concurrent clients. The prefix-cache hit rate
is read off the replicas' own `vllm:prefix_cache_{hits,queries}_total`; the ceiling is what a
router that always found everything cached would get (each request hits the full blocks it
shares with any earlier one). Prints one JSON line per run.

    python3 loadtest/router_tenants.py vllm:round_robin vllm:kv_aware sglang:cache_aware ...

Needs the release binary, ../shared/models, and `pip install vllm-router sglang-router httpx`.
"""

import concurrent.futures
import json
import os
import pathlib
import random
import sys
import tempfile
import time

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "python"))
from test_routers import Replica, Router, free_port  # noqa: E402

TENANTS = 8
QUESTIONS = int(os.environ.get("QUESTIONS", "30"))
CLIENTS = 16
BLOCK = 8
BLOCKS = 100


def system_prompt(t):
    rules = " ".join(f"Rule {k} of shop {t}: be kind about item {k * 7 + t}." for k in range(3))
    # 110 tokens on tiny-llama-v512: 14 blocks of 8, so the 8 tenants' prompts (112 blocks)
    # do not all fit in one replica's 100 blocks, and a third of them do.
    return f"You are the assistant of shop number {t}. Be brief and polite. {rules}"


def prompt(t, q):
    return f"{system_prompt(t)}\nQ: order {q * 13 + t}?\nA:"


def counters(url):
    got = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        for name in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
                     "vllm:request_success_total"):
            if line.startswith(name + "{") or line.startswith(name + " "):
                got[name] = got.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return got


def ceiling(url, jobs):
    """Hits over queries if every request found cached all it shares with any earlier request
    (in sending order): its tenant's system prompt, and the first block all tenants share."""
    ids = {}
    for t, q in jobs:
        r = httpx.post(f"{url}/v1/completions/render", json={"prompt": prompt(t, q)}, timeout=30)
        ids[(t, q)] = r.json()[0]["token_ids"]
    seen, hits, queries = [], 0, 0
    for job in jobs:
        tokens = ids[job]
        queries += len(tokens)
        best = 0
        for earlier in seen:
            common = 0
            for a, b in zip(earlier, tokens):
                if a != b:
                    break
                common += 1
            best = max(best, common)
        hits += min(best, len(tokens) - 1) // BLOCK * BLOCK
        seen.append(tokens)
    return hits / queries


def run(kind, policy, log_dir):
    load_format = "vllm" if kind == "vllm" else "sglang"
    events = kind == "vllm" and policy == "kv_aware" and os.environ.get("KV_EVENTS", "1") != "0"
    replicas = []
    for i in range(3):
        extra = ["--block-size", str(BLOCK), "--kv-cache-memory", f"{BLOCKS * 4}KiB"]
        if events:
            extra += ["--kv-events-endpoint", f"tcp://127.0.0.1:{free_port()}"]
        replicas.append(Replica(f"{kind}-{policy}-{i}", log_dir, load_format, *extra))
    router = None
    try:
        extra = os.environ.get("ROUTER_ARGS", "").split()
        router = Router(kind, policy, [r.url for r in replicas], log_dir, extra)
        jobs = [(t, q) for t in range(TENANTS) for q in range(QUESTIONS)]
        random.Random(7).shuffle(jobs)
        before = [counters(r.url) for r in replicas]
        errors = 0

        def send(job):
            t, q = job
            r = httpx.post(f"{router.url}/v1/completions", timeout=120,
                           headers={"x-tenant-id": f"tenant-{t}", "x-session-id": f"tenant-{t}"},
                           json={"model": "tiny", "prompt": prompt(t, q), "max_tokens": 8})
            return r.status_code == 200

        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            errors = sum(not ok for ok in pool.map(send, jobs))
        seconds = time.monotonic() - start
        after = [counters(r.url) for r in replicas]
        d = lambda name: [a[name] - b[name] for a, b in zip(after, before)]  # noqa: E731
        hits, queries = d("vllm:prefix_cache_hits_total"), d("vllm:prefix_cache_queries_total")
        return {
            "router": kind, "policy": policy, "requests": len(jobs), "errors": errors,
            "hit_rate": round(sum(hits) / max(sum(queries), 1), 4),
            "ceiling": round(ceiling(replicas[0].url, jobs), 4),
            "requests_per_replica": [int(x) for x in d("vllm:request_success_total")],
            "seconds": round(seconds, 2),
        }
    finally:
        if router:
            router.stop()
        for r in replicas:
            r.stop()


def main():
    runs = sys.argv[1:] or ["vllm:round_robin", "vllm:kv_aware"]
    with tempfile.TemporaryDirectory() as log_dir:
        for spec in runs:
            kind, policy = spec.split(":")
            print(json.dumps(run(kind, policy, log_dir)), flush=True)


if __name__ == "__main__":
    main()
