"""GGUF files against the safetensors they came from, and our quantizer against the reference.

Each test writes a GGUF file from a shared model's safetensors the way llama.cpp's
convert_hf_to_gguf.py lays one out (its tensor names and metadata keys, Llama's q/k rows
permuted for GGML's rotary mode), with the `gguf` package from PyPI, whose numpy quantizers are
ggml's reference ones. Then it serves the file, and the same safetensors folder with
`--quantization` set to the same format, and compares what they generate:

- untied Llama models, every matrix Q8_0 (or Q4_0), embeddings f32: both servers must give
  the same greedy tokens with the same log-probabilities to the last bit, which they can only
  if our quantizer wrote the reference's bytes (the kernels and padding are shared);
- the same for Qwen2 (q/k/v biases, no permutation), its output head written out;
- the tied Qwen2 model as llama.cpp writes it (the output head = the Q8_0 token embeddings,
  which stay f32 when quantizing at load): the same greedy tokens until a near-tie flips one,
  log-probabilities within Q8_0's drift, at least 16 tokens in all;
- files the loader cannot read (an architecture or a tensor type it lacks) stop the daemon
  with an error naming what is unsupported.
"""

import json
import pathlib
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest

from conftest import BINARY, MODELS, start_model_daemon, stop_daemon

gguf = pytest.importorskip("gguf")
# llama.cpp's tensor names, shared with the benchmarks' GGUF writer.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "loadtest"))
import hf_to_gguf  # noqa: E402
from hf_to_gguf import gguf_name  # noqa: E402

Q = gguf.GGMLQuantizationType
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
# How far Q8_0 embeddings may move a token's log-probability from f32 embeddings: about twice
# the largest drift whole-model Q8_0 causes on tiny-random-qwen2 (0.26, tests/quantization.rs).
DRIFT = 0.5


def load_f32(path):
    """A safetensors file's tensors as f32 numpy arrays (bf16 too, which numpy lacks)."""
    raw = pathlib.Path(path).read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    data = raw[8 + size:]
    kinds = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        a = np.frombuffer(data[start:end], dtype=kinds[meta["dtype"]]).reshape(meta["shape"])
        if meta["dtype"] == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[name] = a.astype(np.float32)
    return out


def permute(w, heads):
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's rows as interleaved pairs."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_gguf(model, out_dir, qtype, embed_qtype=Q.F32, arch=None, explicit_output=False,
               extra_tensors=(), extra_metadata=()):
    """`out_dir/model.gguf` from shared/models/<model>, with its tokenizer files beside.
    `explicit_output`: a tied model's output head written as its own tensor (quantized like
    the other matrices) instead of being the token embeddings."""
    src = MODELS / model
    if not src.is_dir():
        pytest.skip(f"!!! SKIPPING: {src} not found !!!")
    config = json.loads((src / "config.json").read_text())
    arch = arch or config["model_type"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    path = pathlib.Path(out_dir) / f"{model}.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(config.get("max_position_embeddings", 2048))
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config.get("rope_theta", 10000.0))
    w.add_vocab_size(config["vocab_size"])
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id)):
        value = config.get(key)
        if isinstance(value, list):
            value = value[0]
        if value is not None:
            add(value)
    tensors = load_f32(src / "model.safetensors")
    if explicit_output and "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    for hf, data in sorted(tensors.items()):
        if arch == "llama" and hf.endswith("q_proj.weight"):
            data = permute(data, heads)
        elif arch == "llama" and hf.endswith("k_proj.weight"):
            data = permute(data, kv_heads)
        kind = embed_qtype if hf == "model.embed_tokens.weight" else (
            qtype if data.ndim == 2 else Q.F32)
        if kind == Q.F32:
            w.add_tensor(gguf_name(hf), data)
        else:
            w.add_tensor(gguf_name(hf), gguf.quants.quantize(data, kind), raw_dtype=kind)
    for name, data in extra_tensors:
        w.add_tensor(name, data)
    for key, value in extra_metadata:
        (w.add_string if isinstance(value, str) else w.add_uint32)(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, pathlib.Path(out_dir) / name)
    return path, config


def golden_prompts(model, n=4):
    cases = json.loads((MODELS / model / "golden.json").read_text())["cases"]
    return [c["prompt_ids"] for c in cases[:n]]


def generate(url, prompt_ids, tokens=8):
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "prompt": prompt_ids, "max_tokens": tokens, "temperature": 0, "logprobs": 2,
        "ignore_eos": True})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    return lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]


def serve_pair(gguf_path, model, quantization):
    """Both servers: the GGUF file, and the safetensors folder quantized at load."""
    a = start_model_daemon(str(gguf_path))
    try:
        b = start_model_daemon(model, "--quantization", quantization)
    except BaseException:
        stop_daemon(a[0])
        raise
    return a, b


@pytest.mark.parametrize("model,fmt,quantization", [
    ("tiny-random-llama", Q.Q8_0, "q8_0"),
    ("tiny-llama-v512", Q.Q8_0, "q8_0"),
    ("bench-llama-25m", Q.Q8_0, "q8_0"),
    ("tiny-llama-v512", Q.Q4_0, "q4_0"),
    ("tiny-random-qwen2", Q.Q8_0, "q8_0"),
    ("tiny-random-qwen2", Q.BF16, "bf16"),
    ("tiny-llama-v512", Q.BF16, "bf16"),
    ("tiny-random-qwen2", Q.F16, "f16"),
    ("tiny-llama-v512", Q.F16, "f16"),
])
def test_our_quantizer_writes_the_reference_bytes(tmp_path, model, fmt, quantization):
    path, _ = write_gguf(model, tmp_path, fmt, explicit_output=True)
    (a, url_a), (b, url_b) = serve_pair(path, model, quantization)
    try:
        for ids in golden_prompts(model):
            got, want = generate(url_a, ids), generate(url_b, ids)
            assert got == want, f"{model} {quantization}: GGUF {got} != safetensors {want}"
    finally:
        stop_daemon(a)
        stop_daemon(b)


def test_a_bf16_gguf_quantizes_at_load_from_its_values(tmp_path):
    """`--quantization q8_0` on a BF16 GGUF file quantizes its matrices from their values:
    bench-llama-25m is a bf16 checkpoint, so they are the safetensors' exactly, and both
    servers must generate the same tokens with the same log-probabilities."""
    model = "bench-llama-25m"
    path, _ = write_gguf(model, tmp_path, Q.BF16)
    a = start_model_daemon(str(path), "--quantization", "q8_0")
    try:
        b = start_model_daemon(model, "--quantization", "q8_0")
    except BaseException:
        stop_daemon(a[0])
        raise
    try:
        for ids in golden_prompts(model):
            got, want = generate(a[1], ids), generate(b[1], ids)
            assert got == want, f"BF16 GGUF + q8_0 {got} != safetensors + q8_0 {want}"
    finally:
        stop_daemon(a[0])
        stop_daemon(b[0])


def test_the_benchmarks_gguf_writer_keeps_the_weights_and_the_tokenizer(tmp_path):
    """loadtest/hf_to_gguf.py, which makes the files both servers load in the paired runs
    against llama-server: its f32 GGUF of the R1-Distill-tokenized Qwen2 model generates
    exactly what the folder does, and it carries the tokenizer llama.cpp reads."""
    model = "tiny-r1-distill-qwen2"
    src = MODELS / model
    if not src.is_dir():
        pytest.skip(f"!!! SKIPPING: {src} not found !!!")
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, tmp_path / name)
    path = tmp_path / "model.gguf"
    hf_to_gguf.main(src, path)
    fields = gguf.GGUFReader(str(path)).fields
    tokens = json.loads((src / "tokenizer.json").read_text())
    assert len(fields["tokenizer.ggml.tokens"].data) == json.loads(
        (src / "config.json").read_text())["vocab_size"]
    assert len(fields["tokenizer.ggml.merges"].data) == len(tokens["model"]["merges"])
    (a, url_a), (b, url_b) = start_model_daemon(str(path)), start_model_daemon(model)
    try:
        # This folder has no goldens: text prompts, tokenized by each server.
        for prompt in ("The capital of France is", "def fibonacci(n):", "<think>\nOkay"):
            got, want = generate(url_a, prompt), generate(url_b, prompt)
            assert got == want, f"GGUF {got} != safetensors {want}"
    finally:
        stop_daemon(a)
        stop_daemon(b)


def test_a_tied_qwen2_gguf_generates_what_its_safetensors_do(tmp_path):
    """As llama.cpp writes a tied model: Q8_0 token embeddings, which are the output head too.
    Only the embeddings' rounding differs from the safetensors quantized at load (they stay
    f32 there), so the greedy tokens agree until a near-tie flips, with log-probabilities
    within the drift Q8_0 causes (tests/quantization.rs: at most 0.27 on this model)."""
    model = "tiny-random-qwen2"
    path, _ = write_gguf(model, tmp_path, Q.Q8_0, embed_qtype=Q.Q8_0)
    (a, url_a), (b, url_b) = serve_pair(path, model, "q8_0")
    compared = 0
    try:
        for ids in golden_prompts(model, n=6):
            tokens_a, lp_a, _ = generate(url_a, ids)
            tokens_b, lp_b, _ = generate(url_b, ids)
            for ta, tb, pa, pb in zip(tokens_a, tokens_b, lp_a, lp_b):
                if ta != tb:
                    break  # from here the two continue from different text
                assert abs(pa - pb) <= DRIFT, f"{ids}: {ta} at {pa} against {pb}"
                compared += 1
    finally:
        stop_daemon(a)
        stop_daemon(b)
    assert compared >= 16, f"only {compared} tokens agreed"


def start_failing(gguf_path):
    """Runs the daemon on a file it must refuse: (exit code, stderr)."""
    proc = subprocess.run(
        [str(BINARY), "serve", "--host", "127.0.0.1", "--port", "0", "--model", str(gguf_path)],
        capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stderr


def test_an_unsupported_architecture_is_named(tmp_path):
    path, _ = write_gguf("tiny-llama-v512", tmp_path, Q.Q8_0, arch="gemma2")
    code, err = start_failing(path)
    assert code != 0 and "gemma2" in err and "llama, qwen2" in err, err


def test_an_unsupported_tensor_type_is_named(tmp_path):
    path = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    # One IQ4_XS block (136 bytes for 256 values), as a file of that type would hold.
    w.add_tensor("token_embd.weight", np.zeros((1, 136), dtype=np.uint8), raw_dtype=Q.IQ4_XS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for name in TOKENIZER_FILES:
        src = MODELS / "tiny-llama-v512" / name
        if src.exists():
            shutil.copy(src, tmp_path / name)
    code, err = start_failing(path)
    assert code != 0 and "IQ4_XS" in err, err


def test_a_gguf_without_its_tokenizer_says_where_to_put_it(tmp_path):
    path, _ = write_gguf("tiny-llama-v512", tmp_path, Q.Q8_0)
    (tmp_path / "tokenizer.json").unlink()
    code, err = start_failing(path)
    assert code != 0 and "tokenizer.json" in err, err


def test_a_tensor_the_decoder_would_leave_unread_is_refused(tmp_path):
    """An output-projection bias (or a layer past block_count) would be silently ignored."""
    config = json.loads((MODELS / "tiny-llama-v512" / "config.json").read_text())
    bias = np.zeros(config["hidden_size"], dtype=np.float32)
    path, _ = write_gguf("tiny-llama-v512", tmp_path, Q.Q8_0,
                         extra_tensors=[("blk.0.attn_output.bias", bias)])
    code, err = start_failing(path)
    assert code != 0 and "blk.0.attn_output.bias" in err, err


def test_one_part_of_a_split_gguf_says_to_merge_them(tmp_path):
    path, _ = write_gguf("tiny-llama-v512", tmp_path, Q.Q8_0, extra_metadata=[("split.count", 3)])
    code, err = start_failing(path)
    assert code != 0 and "merge" in err, err


@pytest.mark.parametrize("metadata,named", [
    # tiny-llama-v512's heads are 16 wide: rotating 8 of them is partial rotary.
    ([("llama.rope.dimension_count", 8)], "rope.dimension_count"),
    ([("llama.rope.scaling.type", "yarn"), ("llama.rope.scaling.factor", 4)], "yarn"),
])
def test_a_rope_the_decoder_does_not_compute_is_refused(tmp_path, metadata, named):
    path, _ = write_gguf("tiny-llama-v512", tmp_path, Q.Q8_0, extra_metadata=metadata)
    code, err = start_failing(path)
    assert code != 0 and named in err and "not supported" in err, err
