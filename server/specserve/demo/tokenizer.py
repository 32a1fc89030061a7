"""Byte-level BPE tokenizer for the demo model, written as a Hugging Face tokenizer directory.

Every newline is its own pre-token: with the GPT-2 pre-split a newline merges with the next line's
indentation, so a prompt ending in a bare newline would force the model to dedent. Isolating
newlines lets the model choose the indentation after ``"def f():\\n"``.

Example (after training): ``encode("x = 1\\n    y")`` keeps ``"\\n"`` as one token and ``"   "``
(three spaces) + ``" y"`` as the indentation and the name.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from specserve.demo.spec import CHAT_TEMPLATE, SPECIAL_TOKENS


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> "object":
    """Train the BPE model on ``texts``; returns a ``tokenizers.Tokenizer``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: "object", out: Path, context: int) -> None:
    """Write tokenizer.json + tokenizer_config.json (with the chat template) for AutoTokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))  # type: ignore[attr-defined]
    added = {
        str(tok.token_to_id(t)): {  # type: ignore[attr-defined]
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": context,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|end|>", "pad_token": "<|endoftext|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def byte_lengths(tok: "object") -> list[int]:
    """Number of UTF-8 bytes each token id stands for (0 for special tokens).

    Byte-level BPE maps every byte to one printable character, so a token's byte length is the
    number of characters in its vocabulary string.
    """
    vocab: dict[str, int] = tok.get_vocab()  # type: ignore[attr-defined]
    lengths = [0] * len(vocab)
    specials = set(SPECIAL_TOKENS)
    for piece, idx in vocab.items():
        lengths[idx] = 0 if piece in specials else len(piece)
    return lengths
