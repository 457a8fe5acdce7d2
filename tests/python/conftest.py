"""Starts the real `distillery serve` on a free loopback port for the Python client tests."""

import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODELS = ROOT.parent / "shared" / "models"
BINARY = ROOT / "target" / "release" / "distillery"
FIXTURES = ROOT / "tests" / "fixtures"
# tests/fixtures/hermes-qwen2 holds only a tokenizer_config.json: the rest of the model folder
# is linked from this shared model (see that folder's README.md).
HERMES_BASE = "tiny-random-qwen2"
HERMES_LINKED = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")


def one_engine():
    """The environment for a daemon with one engine unless its flags ask for more: `auto`
    would give the small test models one per core, and what a test counts (cache hits, load,
    KV events by rank) would depend on the machine."""
    return {**os.environ, "DISTILLERY_DATA_PARALLEL_SIZE": "1"}


def start_daemon(*extra):
    return start_model_daemon("tiny-random-qwen2", *extra)


def start_model_daemon(model, *extra):
    """`distillery serve --model MODELS/<model> *extra` on a free port: (process, base url).
    `model` is a folder name under shared/models, or a path to a model folder or GGUF file
    elsewhere (an absolute path is used as it is: `MODELS / path` is `path`)."""
    if not (MODELS / model).exists():
        pytest.skip(f"!!! SKIPPING: {MODELS / model} not found !!!")
    if not BINARY.exists():
        pytest.fail(f"{BINARY} missing: run `cargo build --release` first")
    proc = subprocess.Popen(
        [str(BINARY), "serve", "--host", "127.0.0.1", "--port", "0",
         "--model", str(MODELS / model), *extra],
        env=one_engine(),
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


def assemble_hermes_qwen2(dest):
    """tests/fixtures/hermes-qwen2 as a whole model folder at `dest` (created): the shared
    tiny-random-qwen2's weights, config and tokenizer.json linked, the fixture's
    tokenizer_config.json (Qwen2.5's Hermes `<tool_call>` template) copied. Skips, loudly, when
    the shared model is absent."""
    base = MODELS / HERMES_BASE
    if not base.is_dir():
        pytest.skip(f"!!! SKIPPING: {base} not found !!!")
    dest = pathlib.Path(dest)
    dest.mkdir(parents=True)
    for name in HERMES_LINKED:
        (dest / name).symlink_to(base / name)
    shutil.copyfile(FIXTURES / "hermes-qwen2" / "tokenizer_config.json", dest / "tokenizer_config.json")
    return dest


@pytest.fixture(scope="session")
def hermes_qwen2(tmp_path_factory):
    """The path of the assembled hermes-qwen2 model folder (a temporary directory, absolute):
    pass it to `model_daemon` or `start_model_daemon` as the model. Its served name is the
    folder's, `hermes-qwen2`."""
    return assemble_hermes_qwen2(tmp_path_factory.mktemp("models") / "hermes-qwen2")


@pytest.fixture(scope="session")
def golden():
    import json
    return json.loads((MODELS / "tiny-random-qwen2" / "golden.json").read_text())


@pytest.fixture(scope="module")
def model_daemon():
    """A factory for daemons serving another model folder of shared/models (or, given an
    absolute path such as the `hermes_qwen2` fixture's, that folder):
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
