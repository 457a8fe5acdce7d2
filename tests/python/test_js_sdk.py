"""The daemon driven by the official `openai` npm package (the JS/TS SDK), as Node users will.

The checks live in tests/js/check.mjs, one node process per case; they need
`npm ci --prefix tests/js` (tests/js/package-lock.json pins the SDK) and Node 20+.
"""

import pathlib
import shutil
import subprocess

import pytest

JS = pathlib.Path(__file__).resolve().parents[1] / "js"
SCRIPT = JS / "check.mjs"
MODEL = "tiny-random-qwen2"
CASES = ["models", "chat", "stream", "completions", "errors"]
TIMEOUT_S = 180


def node_or_skip():
    node = shutil.which("node")
    if node is None:
        pytest.skip("!!! SKIPPING: `node` is not on PATH; the JS SDK tests need Node 20+ !!!")
    if not (JS / "node_modules" / "openai" / "package.json").is_file():
        pytest.skip(
            f"!!! SKIPPING: {JS / 'node_modules'} is absent (or has no openai): "
            "run `npm ci --prefix tests/js` !!!"
        )
    return node


@pytest.fixture(scope="module")
def node():
    return node_or_skip()


@pytest.fixture(scope="module")
def js_daemon(node, model_daemon):
    # `node` first: skip before a daemon is started for nothing.
    return model_daemon(MODEL)


@pytest.mark.parametrize("case", CASES)
def test_js_sdk(node, js_daemon, case):
    cmd = [node, str(SCRIPT), js_daemon, case, MODEL]
    try:
        r = subprocess.run(
            cmd, cwd=JS, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"`{' '.join(cmd)}` ran past {TIMEOUT_S} s; its output so far:\n{out}")
    print(r.stdout)
    assert r.returncode == 0, (
        f"`{' '.join(cmd)}` exited with {r.returncode}; node's output:\n{r.stdout}"
    )
