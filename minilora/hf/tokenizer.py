"""The tokenizer of a Hugging Face folder (``tokenizer.json``), through the ``tokenizers`` package.

    tok = load_tokenizer("path/to/gpt2-dir")     # pip install 'minilora[hf]'
    ids = tok.encode("The Eagle serves French food.")
    text = tok.decode(ids)                       # byte-level BPE: decode(encode(s)) == s
    generate(model, [ids], 20, eos_id=tok.eos_id)   # minilora.generate.generate

The same small interface as ``minilora.data.Tokenizer`` (``encode``, ``decode``, ``eos_id``,
``vocab_size``), so ``generate`` and fine-tuning use either one.
"""

from __future__ import annotations

import json
import os

from .checkpoint import HFFormatError, resolve_dir

__all__ = ["HFTokenizer", "load_tokenizer"]


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("load_tokenizer needs the `tokenizers` package: pip install 'minilora[hf]'") from None
    return tokenizers


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with minilora's tokenizer interface."""

    def __init__(self, tokenizer, eos_token: str | None = None, source: str = "tokenizer"):
        self.tokenizer = tokenizer
        self.source = source
        eos_token = eos_token or "<|endoftext|>"
        self.eos_token = eos_token
        self.eos_id = tokenizer.token_to_id(eos_token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Text -> token ids (no special tokens added)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids, skip_special: bool = False) -> str:
        """Token ids -> text; ``skip_special`` drops special tokens such as <|endoftext|>."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, token: str):
        return self.tokenizer.token_to_id(token)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.source!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _eos_token(folder: str) -> str | None:
    path = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
        except (OSError, ValueError):
            return None
        if isinstance(eos, dict):  # older files: {"content": "<|endoftext|>", ...}
            eos = eos.get("content")
        return eos if isinstance(eos, str) else None
    return None


def load_tokenizer(path, cache_dir=None) -> HFTokenizer:
    """The tokenizer of a Hugging Face folder (or a cached hub name): ``tokenizer.json``, else GPT-2's
    ``vocab.json`` + ``merges.txt`` (byte-level BPE). Needs the ``tokenizers`` package (extra ``hf``)."""
    tokenizers = _tokenizers()
    folder = resolve_dir(path, cache_dir, what="tokenizer folder")
    single = os.path.join(folder, "tokenizer.json")
    vocab, merges = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    try:
        if os.path.exists(single):
            tok = tokenizers.Tokenizer.from_file(single)
        elif os.path.exists(vocab) and os.path.exists(merges):
            from tokenizers import decoders, models, pre_tokenizers

            tok = tokenizers.Tokenizer(models.BPE.from_file(vocab, merges))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
        else:
            raise HFFormatError(f"{folder}: no tokenizer.json (nor GPT-2's vocab.json + merges.txt)")
    except HFFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 (tokenizers raises a bare Exception on a bad file)
        raise HFFormatError(f"{folder}: the tokenizer files cannot be read ({type(exc).__name__}: {exc})") from None
    return HFTokenizer(tok, _eos_token(folder), source=folder)
