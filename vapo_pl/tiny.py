"""Tiny Qwen2-architecture models with a character-level tokenizer, built locally.

Used by the tests, the benchmarks and the demo: nothing can be downloaded here, and a 0.3 M-parameter
model runs through the same code paths (vLLM, transformers, Lightning) as a 32 B one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PAD, EOS = "<pad>", "<eos>"
DEFAULT_CHARS = (
    " \n0123456789+-*/=()[]{}<>.,:;!?$%^&_|\\'\"#@~`abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
# A minimal chat template: the "user" text followed by the generation prompt marker.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}Q:{{ m['content'] }}\n{% else %}"
    "A:{{ m['content'] }}<eos>{% endif %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map (what byte-level BPE vocabularies are written in)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_char_tokenizer(chars: str = DEFAULT_CHARS):
    """A byte-level BPE tokenizer with no merges: one token per character of ``chars`` (ASCII), plus
    ``<pad>`` (0) and ``<eos>`` (1).

    Written in byte-level form (space as "\u0120", newline as "\u010a") so that it encodes identically
    whether it is loaded as itself, as the ``Qwen2Tokenizer`` that ``AutoTokenizer`` picks for a Qwen2
    checkpoint, or by vLLM.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    uniq = list(dict.fromkeys(chars))
    bad = [c for c in uniq if ord(c) > 127]
    if bad:
        raise ValueError(f"chars: only ASCII characters are supported, got {bad[:5]}")
    b2u = _byte_to_unicode()
    vocab = {PAD: 0, EOS: 1, **{b2u[ord(c)]: i + 2 for i, c in enumerate(uniq)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, clean_up_tokenization_spaces=False
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    path: str | Path,
    *,
    chars: str = DEFAULT_CHARS,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> Path:
    """Build a randomly initialised Qwen2 causal LM and its tokenizer, save both to ``path``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    tokenizer = build_char_tokenizer(chars)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # vLLM reads the chat template from tokenizer_config.json; keep it explicit.
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_file.write_text(json.dumps(cfg, indent=2))
    return path
