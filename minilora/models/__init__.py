"""Models: the tiny GPT-2."""

from .gpt import GPT, GPTConfig, KVCache  # noqa: F401
from .pretrained import load_base, load_model, save_model  # noqa: F401
