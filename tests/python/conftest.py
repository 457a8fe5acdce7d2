"""Starts the real `distillery serve` on a free loopback port for the Python client tests."""

import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODELS = ROOT.parent / "shared" / "models"
BINARY = ROOT / "target" / "release" / "distillery"


def start_daemon(*extra):
    return start_model_daemon("tiny-random-qwen2", *extra)


def start_model_daemon(model, *extra):
    """`distillery serve --model MODELS/<model> *extra` on a free port: (process, base url)."""
    if not (MODELS / model).is_dir():
        pytest.skip(f"!!! SKIPPING: {MODELS / model} not found !!!")
    if not BINARY.exists():
        pytest.fail(f"{BINARY} missing: run `cargo build --release` first")
    proc = subprocess.Popen(
        [str(BINARY), "serve", "--host", "127.0.0.1", "--port", "0",
         "--model", str(MODELS / model), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("distillery listening on "):
            return proc, line.split()[-1]
    proc.kill()
    pytest.fail("the daemon did not report its address")


def stop_daemon(proc):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    print(f"daemon exited with {proc.returncode}", file=sys.stderr)


@pytest.fixture(scope="session")
def daemon():
    proc, url = start_daemon()
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    print(f"daemon exited with {proc.returncode}", file=sys.stderr)


@pytest.fixture(scope="session")
def golden():
    import json
    return json.loads((MODELS / "tiny-random-qwen2" / "golden.json").read_text())


@pytest.fixture(scope="module")
def model_daemon():
    """A factory for daemons serving another model folder of shared/models:
    `url = model_daemon("tiny-r1-distill-qwen2", "--reasoning-budget", "4")`. Each call starts
    one daemon; all of them stop when the module's tests are done."""
    procs = []

    def launch(model, *extra):
        proc, url = start_model_daemon(model, *extra)
        procs.append(proc)
        return url

    yield launch
    for proc in procs:
        stop_daemon(proc)
