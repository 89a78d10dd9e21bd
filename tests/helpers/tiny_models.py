"""Tiny random causal LMs of each supported family, built from configs (no downloads).

Shared by the test modules: ``make_model("llama", vocab_size)`` gives a 2-block model small
enough for float64 brute-force references.
"""

from __future__ import annotations

import torch
import transformers as tf

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "gpt_neox", "opt", "phi")


def make_config(family: str, vocab_size: int, hidden: int = 16, layers: int = 2):
    common = {"vocab_size": vocab_size, "num_hidden_layers": layers, "num_attention_heads": 2}
    if family == "gpt2":
        return tf.GPT2Config(
            n_layer=layers,
            n_embd=hidden,
            n_head=2,
            vocab_size=vocab_size,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=0,
        )
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}
        return cls[family](
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_key_value_heads=1,
            max_position_embeddings=128,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            **common,
        )
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            max_position_embeddings=128,
            bos_token_id=0,
            eos_token_id=0,
            **common,
        )
    if family == "opt":
        return tf.OPTConfig(
            hidden_size=hidden,
            ffn_dim=2 * hidden,
            word_embed_proj_dim=hidden,
            max_position_embeddings=128,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            **common,
        )
    if family == "phi":
        return tf.PhiConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            max_position_embeddings=128,
            bos_token_id=0,
            eos_token_id=0,
            **common,
        )
    raise ValueError(f"unknown family {family}")


def make_model(
    family: str,
    vocab_size: int,
    *,
    seed: int = 0,
    dtype=torch.float64,
    hidden: int = 16,
    layers: int = 2,
):
    """A randomly initialised model in eval mode, in ``dtype``.

    SDPA attention: the eager path of most families computes its softmax in float32 even for
    a float64 model, which would blur float64 reference comparisons at ~1e-8.
    """
    torch.manual_seed(seed)
    config = make_config(family, vocab_size, hidden, layers)
    config._attn_implementation = "sdpa"
    model = tf.AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval()
