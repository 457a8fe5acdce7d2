"""Distillery behind the routers users scale out with: vllm-router and the SGLang model gateway
(sglang-router), both from PyPI, each in front of three replicas of tiny-llama-v512, all on
loopback.

The replicas log every path they lack ("no such endpoint"): after the routers' discovery,
health checks and load polling, no replica may have logged one. Through each router: chat,
completions and a streamed chat with the openai SDK, and (sglang-router) a request without
`model`. Which replica served what is read off each replica's own request counters. With
`power_of_two` the router reads each replica's `/get_load` (in its own shape,
`--get-load-format`): a replica kept busy by long requests sent to it directly stops getting
the router's requests; a router reading no load would keep sending it a third of them.
"""

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from conftest import BINARY, MODELS, one_engine

MODEL = "tiny-llama-v512"
SERVED = "tiny"
ROUTERS = {"vllm": "vllm-router", "sglang": "sglang-router"}


def router_binary(kind):
    name = ROUTERS[kind]
    found = shutil.which(name) or shutil.which(name, path=str(pathlib.Path(sys.executable).parent))
    if not found:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (pip install {name})")
        pytest.skip(f"!!! SKIPPING: {name} not installed (pip install {name}) !!!")
    return found


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    """`distillery serve` named `name`, its stderr kept in a file."""

    def __init__(self, name, log_dir, load_format, *extra):
        if not BINARY.exists():
            pytest.fail(f"{BINARY} missing: run `cargo build --release` first")
        if not (MODELS / MODEL).is_dir():
            pytest.skip(f"!!! SKIPPING: {MODELS / MODEL} not found !!!")
        self.name = name
        self.log = pathlib.Path(log_dir) / f"{name}.log"
        self.proc = subprocess.Popen(
            [str(BINARY), "serve", "--host", "127.0.0.1", "--port", "0",
             "--model", str(MODELS / MODEL), "--served-model-name", SERVED,
             "--get-load-format", load_format,
             *(extra if "--kv-cache-memory" in extra else ("--kv-cache-memory", "32MiB", *extra))],
            stdout=subprocess.PIPE, stderr=open(self.log, "w"), text=True, env=one_engine(),
        )
        deadline = time.monotonic() + 60
        self.url = None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith("distillery listening on "):
                self.url = line.split()[-1]
                return
        self.stop()
        pytest.fail(f"replica {name} did not report its address:\n{self.log.read_text()}")

    def finished(self, reason=None):
        """Requests this replica finished (counted before their answers leave), by reason."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith("vllm:request_success_total{") and (
                    reason is None or f'finished_reason="{reason}"' in line):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def missing_endpoints(self):
        return [l for l in self.log.read_text().splitlines() if "no such endpoint" in l]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Router:
    """A router in front of `urls`, polling health and load every second."""

    def __init__(self, kind, policy, urls, log_dir, extra=()):
        binary = router_binary(kind)
        port, prom = free_port(), free_port()
        common = ["--worker-urls", *urls, "--policy", policy, "--host", "127.0.0.1",
                  "--port", str(port), "--prometheus-port", str(prom),
                  "--health-check-interval-secs", "1", "--worker-startup-check-interval", "1"]
        common += list(extra)
        argv = [binary, *common] if kind == "vllm" else [binary, "launch", *common]
        self.log = pathlib.Path(log_dir) / f"{kind}-{policy}.log"
        self.proc = subprocess.Popen(argv, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{kind} router exited:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)  # polling for the router to listen, not synchronising a result
        self.stop()
        pytest.fail(f"{kind} router never became healthy:\n{self.log.read_text()[-4000:]}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def replicas_for(kind, tmp_path):
    fmt = "vllm" if kind == "vllm" else "sglang"
    return [Replica(f"r{i}", tmp_path, fmt) for i in range(3)]


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_requests_route_through_the_router_and_no_worker_endpoint_is_missing(kind, tmp_path):
    replicas = replicas_for(kind, tmp_path)
    router = None
    try:
        router = Router(kind, "round_robin", [r.url for r in replicas], tmp_path)
        before = [r.finished() for r in replicas]
        client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="none", max_retries=0)
        for _ in range(3):
            chat = client.chat.completions.create(
                model=SERVED, messages=[{"role": "user", "content": "Where is my order?"}],
                max_tokens=4)
            assert chat.model == SERVED and chat.choices[0].message.content is not None
            text = client.completions.create(model=SERVED, prompt="hello", max_tokens=3)
            assert text.choices[0].text is not None
        stream = client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
            stream=True)
        chunks = list(stream)
        assert chunks and chunks[-1].choices[0].finish_reason == "length", chunks
        if kind == "sglang":
            # The gateway forwards a request without `model` as "unknown": still served.
            r = httpx.post(f"{router.url}/v1/chat/completions", timeout=60,
                           json={"messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": 3})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == SERVED
        served = [r.finished() - b for r, b in zip(replicas, before)]
        assert all(n > 0 for n in served), f"round robin reached {served}"
        for r in replicas:
            assert r.missing_endpoints() == [], (r.name, r.missing_endpoints())
    finally:
        if router:
            router.stop()
        for r in replicas:
            r.stop()


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_power_of_two_sends_nothing_to_a_busy_replica(kind, tmp_path):
    replicas = replicas_for(kind, tmp_path)
    router = None
    stop = threading.Event()
    busy = []
    try:
        router = Router(kind, "power_of_two", [r.url for r in replicas], tmp_path)

        def keep_busy():
            # One long request after another, straight to r0, until the test ends.
            while not stop.is_set():
                try:
                    httpx.post(f"{replicas[0].url}/v1/completions", timeout=120,
                               json={"prompt": "busy", "max_tokens": 1900, "ignore_eos": True})
                except httpx.HTTPError:
                    return
        busy = [threading.Thread(target=keep_busy, daemon=True) for _ in range(6)]
        for t in busy:
            t.start()
        load_url = f"{replicas[0].url}/get_load"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            load = httpx.get(load_url, timeout=5).json()
            running = load["load"] if kind == "vllm" else sum(x["num_reqs"] for x in load)
            if running >= 6:
                break
        else:
            pytest.fail(f"r0 never got busy: {load}")
        # The router reads loads every second: within the requests below it must have read
        # r0's, and from then on send it nothing. 30 in a row elsewhere by chance (a router
        # blind to load sends r0 a third) is (2/3)^30 ~ 5e-6 per window. The router's requests
        # end "stop" (a one-word choice), the busy ones "length": r0's "stop" count says
        # whether it served each one.
        body = {"model": SERVED, "prompt": "short", "guided_choice": ["ok"], "max_tokens": 4}
        to_r0 = []
        for _ in range(400):
            before = replicas[0].finished("stop")
            r = httpx.post(f"{router.url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["finish_reason"] == "stop", r.text
            to_r0.append(replicas[0].finished("stop") > before)
            if len(to_r0) >= 30 and not any(to_r0[-30:]):
                break
        assert not any(to_r0[-30:]), f"{kind} power_of_two kept using the busy replica: {to_r0}"
        for r in replicas:
            assert r.missing_endpoints() == [], (r.name, r.missing_endpoints())
    finally:
        stop.set()
        if router:
            router.stop()
        for r in replicas:
            r.stop()
        for t in busy:
            t.join(timeout=30)
