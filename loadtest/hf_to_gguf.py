#!/usr/bin/env python3
"""A Qwen2 Hugging Face folder (safetensors, bf16/f16/f32) as one GGUF file llama.cpp can serve.

    python3 loadtest/hf_to_gguf.py MODEL_DIR OUT.gguf

For the paired runs against llama-server (`loadtest/vs_llama_server.sh`): llama.cpp's own
`convert_hf_to_gguf.py` needs torch, which this machine does not have. This writes the same
layout with llama.cpp's `gguf` package (PyPI): its tensor names and metadata keys, the
tensors in the folder's own dtype (bf16 stays bf16: `llama-quantize` makes the Q8_0 / Q4_K_M
files from it), and the byte-level BPE tokenizer from tokenizer.json (tokens, types, merges,
`pre` = qwen2, which llama.cpp also uses for R1-Distill-Qwen), the special ids and the chat
template from tokenizer_config.json, so llama-server tokenizes as the folder's tokenizer does.
Tensors are read through memory maps: a 1.5B model needs no more than its pages in flight.
"""

import json
import pathlib
import sys

import numpy as np

import gguf

LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
FIXED_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
               "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
DTYPES = {"F32": (np.float32, gguf.GGMLQuantizationType.F32),
          "F16": (np.float16, gguf.GGMLQuantizationType.F16),
          "BF16": (np.uint16, gguf.GGMLQuantizationType.BF16)}


def gguf_name(hf):
    if hf in FIXED_NAMES:
        return FIXED_NAMES[hf]
    _, _, layer, rest = hf.split(".", 3)
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_NAMES[part]}.{kind}"


def safetensors(folder):
    """(name, dtype name, shape, memory-mapped bytes) of every tensor in the folder."""
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
        for name, meta in header.items():
            if name != "__metadata__":
                start, end = meta["data_offsets"]
                yield name, meta["dtype"], meta["shape"], data[start:end]


def add_tokenizer(w, folder, config):
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    if tok["model"]["type"] != "BPE":
        sys.exit(f"{folder}: only byte-level BPE tokenizers are written, not {tok['model']['type']}")
    vocab_size = config["vocab_size"]
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in tok["model"]["vocab"].items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in tok["added_tokens"]:
        i = added["id"]
        tokens[i] = added["content"]
        types[i] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}

    def special(key):
        value = tok_config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return ids.get(value) if value else None

    for key, add in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                     ("pad_token", w.add_pad_token_id)):
        if (i := special(key)) is not None:
            add(i)
    w.add_add_bos_token(bool(tok_config.get("add_bos_token", False)))
    if tok_config.get("chat_template"):
        w.add_chat_template(tok_config["chat_template"])


def main(folder, out):
    folder = pathlib.Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "qwen2":
        sys.exit(f"{folder}: model_type {config.get('model_type')!r}; this writer knows qwen2 only")
    w = gguf.GGUFWriter(str(out), "qwen2")
    w.add_name(folder.name)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config.get("rope_theta", 10000.0))
    kinds = set()
    for name, dtype, shape, raw in safetensors(folder):
        np_dtype, kind = DTYPES[dtype]
        kinds.add(dtype)
        if len(shape) == 1:
            # Norms and biases: f32, as convert_hf_to_gguf.py writes them.
            values = raw.view(np_dtype)
            if dtype == "BF16":
                values = (values.astype(np.uint32) << 16).view(np.float32)
            w.add_tensor(gguf_name(name), values.astype(np.float32))
        else:
            w.add_tensor(gguf_name(name), raw.reshape(shape[0], -1), raw_dtype=kind)
    w.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                     "BF16": gguf.LlamaFileType.MOSTLY_BF16}[max(kinds)])
    add_tokenizer(w, folder, config)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
