"""KV-cache events as routers read them: a real daemon publishing on ZMQ, subscribed to with
pyzmq and decoded with msgpack, the block hashes recomputed with cbor2 and hashlib in vLLM's
sha256_cbor scheme (seed "0") from the token ids `/v1/completions/render` gives. Then vllm-router
with `kv_aware` in front of three replicas publishing events: each tenant's requests go where
its system prompt is cached.
"""

import concurrent.futures
import hashlib
import socket
import threading
import time

import cbor2
import httpx
import msgpack
import pytest
import zmq

from test_routers import MODEL, Replica, Router, free_port  # noqa: F401  (MODEL: skip rule)

BLOCK = 8
END = (-1).to_bytes(8, "big", signed=True)


def recomputed(token_ids, seed="0"):
    """vLLM's sha256_cbor hashes of the full blocks of `token_ids`, as events carry them (the
    last 8 bytes, big-endian)."""
    parent = hashlib.sha256(cbor2.dumps(seed, canonical=True)).digest()
    out = []
    for i in range(len(token_ids) // BLOCK):
        block = tuple(token_ids[i * BLOCK:(i + 1) * BLOCK])
        parent = hashlib.sha256(cbor2.dumps((parent, block, None), canonical=True)).digest()
        out.append(int.from_bytes(parent[24:], "big"))
    return out


class Mirror:
    """A SUB socket's view of one replica's cache: stored hashes minus removed ones."""

    def __init__(self, ctx, endpoint):
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.RCVTIMEO, 100)
        self.sock.connect(endpoint)
        self.held = set()
        self.stored = set()
        self.seqs = []
        self.errors = []

    def drain(self):
        while True:
            try:
                frames = self.sock.recv_multipart()
            except zmq.Again:
                return
            self.apply(frames)

    def apply(self, frames):
        if len(frames) != 3:
            self.errors.append(f"{len(frames)} frames")
            return
        self.seqs.append(int.from_bytes(frames[1], "big"))
        ts, events, rank = msgpack.unpackb(frames[2])
        assert ts > 0 and rank == 0
        for e in events:
            if e["type"] == "BlockStored":
                assert len(e["token_ids"]) == len(e["block_hashes"]) * e["block_size"]
                assert e["block_size"] == BLOCK and e["medium"] == "DEVICE"
                for h in e["block_hashes"]:
                    if h in self.held:
                        self.errors.append(f"{h} stored twice")
                    self.held.add(h)
                    self.stored.add(h)
            elif e["type"] == "BlockRemoved":
                for h in e["block_hashes"]:
                    if h not in self.held:
                        self.errors.append(f"{h} removed but not held")
                    self.held.discard(h)
            else:
                self.errors.append(f"unknown event {e}")


def cached_blocks(url):
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("distillery:kv_cache_blocks{") and 'state="cached"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    raise AssertionError("no cached block gauge")


def converge(mirror, url):
    """Drains events until the mirror holds as many blocks as the replica says it caches (the
    events and the gauge both leave at the end of a step, after the answer)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        mirror.drain()
        if len(mirror.held) == cached_blocks(url):
            return
    raise AssertionError(f"mirror {len(mirror.held)} vs cached {cached_blocks(url)}")


def test_events_mirror_the_cache_with_vllm_hashes_and_replay(tmp_path):
    pub, replay = free_port(), free_port()
    r = Replica("events", tmp_path, "sglang", "--block-size", str(BLOCK),
                "--kv-cache-memory", "64KiB",
                "--kv-events-endpoint", f"tcp://127.0.0.1:{pub}",
                "--kv-events-replay-endpoint", f"tcp://127.0.0.1:{replay}")
    ctx = zmq.Context()
    try:
        sources = httpx.get(f"{r.url}/kv_event_sources", timeout=10).json()
        assert sources["0"]["endpoint"] == f"tcp://127.0.0.1:{pub}"
        assert sources["0"]["publisher"] == "zmq" and sources["0"]["encoding"] == "msgpack"
        mirror = Mirror(ctx, f"tcp://127.0.0.1:{pub}")
        # A slow joiner sees nothing sent before its subscription is set up: send a probe
        # request until a first event arrives, and count everything from there on.
        deadline = time.monotonic() + 10
        while not mirror.seqs and time.monotonic() < deadline:
            httpx.post(f"{r.url}/v1/completions", timeout=30,
                       json={"prompt": f"probe {time.monotonic()}", "max_tokens": 1})
            mirror.drain()
        assert mirror.seqs, "no event arrived"
        # Prompts sharing prefixes, in a cache too small for them all: hits and evictions.
        system = "You are Sunny, the assistant of BrightCart. Answer briefly. "
        prompts = [system + f"Question {i}: where is order {i * 7}?" for i in range(40)]
        prompts += [f"Another tenant {i % 3} asks about returns and refunds, case {i}."
                    for i in range(20)]
        expected = set()
        for p in prompts:
            out = httpx.post(f"{r.url}/v1/completions", timeout=30,
                             json={"prompt": p, "max_tokens": 1})
            assert out.status_code == 200, out.text
            ids = httpx.post(f"{r.url}/v1/completions/render", timeout=30,
                             json={"prompt": p}).json()[0]["token_ids"]
            # The prompt's full blocks (max_tokens 1: the output token is never computed).
            expected.update(recomputed(ids))
        converge(mirror, r.url)
        assert mirror.errors == []
        # Every block stored after the probe is a block of one of these prompts, hashed as
        # vLLM hashes it.
        assert mirror.stored, "blocks were stored"
        strays = {h for h in mirror.stored if h not in expected}
        probe_blocks = len(strays)
        assert probe_blocks <= 4, f"{probe_blocks} stored hashes match no prompt"
        assert len(mirror.stored) > cached_blocks(r.url), "the small cache evicted blocks"
        # The sequence numbers count up by one from 0.
        assert mirror.seqs == list(range(mirror.seqs[0], mirror.seqs[0] + len(mirror.seqs)))

        # A late subscriber replays from 0 and reaches the same cache.
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.RCVTIMEO, 5000)
        dealer.connect(f"tcp://127.0.0.1:{replay}")
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        late = Mirror(ctx, f"tcp://127.0.0.1:{pub}")
        late.sock.close()
        while True:
            frames = dealer.recv_multipart()
            assert frames[0] == b""
            if frames[2] == END:
                break
            late.apply(frames[1:])
        assert late.seqs[0] == 0 and late.seqs == list(range(len(late.seqs)))
        assert late.errors == [] and late.held == mirror.held

        # A flush empties the cache, and the events say so.
        assert httpx.post(f"{r.url}/flush_cache", timeout=10).status_code == 200
        converge(mirror, r.url)
        assert mirror.held == set() and cached_blocks(r.url) == 0
        assert mirror.errors == []
    finally:
        ctx.destroy(linger=0)
        r.stop()


TENANTS = 8


def tenant_prompt(t, i):
    # ~110 tokens of system prompt per tenant, then a short question.
    system = f"Tenant {t} policy. " + " ".join(f"rule{t}-{k} applies to orders." for k in range(22))
    return system + f" Customer question {i}: where is my parcel?"


def hit_rate(replicas, before):
    hits = queries = 0
    for r, (h0, q0) in zip(replicas, before):
        h, q = prefix_counters(r.url)
        hits += h - h0
        queries += q - q0
    return hits / max(queries, 1)


def prefix_counters(url):
    text = httpx.get(f"{url}/metrics", timeout=10).text
    got = {}
    for line in text.splitlines():
        for name in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"):
            if line.startswith(name + "{") or line.startswith(name + " "):
                got[name] = float(line.rsplit(" ", 1)[1])
    return got["vllm:prefix_cache_hits_total"], got["vllm:prefix_cache_queries_total"]


def test_kv_aware_routes_each_tenant_to_its_cached_prompt(tmp_path):
    replicas = []
    router = None
    try:
        for i in range(3):
            replicas.append(Replica(
                f"kv{i}", tmp_path, "vllm", "--block-size", "16", "--kv-cache-memory", "1MiB",
                "--kv-events-endpoint", f"tcp://127.0.0.1:{free_port()}"))
        router = Router("vllm", "kv_aware", [r.url for r in replicas], tmp_path)
        before = [prefix_counters(r.url) for r in replicas]
        served = [0, 0, 0]

        def tenant(t):
            # Each tenant's requests one after another; the tenants at once, so the router's
            # load term spreads their first requests.
            for i in range(6):
                out = httpx.post(f"{router.url}/v1/completions", timeout=60,
                                 json={"model": "tiny", "prompt": tenant_prompt(t, i),
                                       "max_tokens": 8})
                assert out.status_code == 200, out.text

        with concurrent.futures.ThreadPoolExecutor(TENANTS) as pool:
            list(pool.map(tenant, range(TENANTS)))
        rate = hit_rate(replicas, before)
        for i, r in enumerate(replicas):
            h, q = prefix_counters(r.url)
            served[i] = q - before[i][1]
        assert all(s > 0 for s in served), f"a replica sat idle: {served}"
        # The first request of each tenant misses; the other five hit its ~110-token prefix.
        assert rate >= 0.7, f"hit rate {rate:.3f} (queries by replica {served})"
        log = router.log.read_text()
        assert "cannot index" not in log and "invalid" not in log.lower(), log[-3000:]
        for r in replicas:
            assert r.missing_endpoints() == [], (r.name, r.missing_endpoints())
    finally:
        if router:
            router.stop()
        for r in replicas:
            r.stop()
