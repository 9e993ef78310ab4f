"""Models: the tiny GPT-2."""

from .gpt import GPT, GPTConfig, KVCache  # noqa: F401
