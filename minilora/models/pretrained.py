"""The shipped base model: one pre-trained GPT that tutorials and the demo start from.

``minilora pretrain`` writes ``minilora/assets/base.safetensors`` (weights) and
``minilora/assets/base.json`` (GPTConfig, how it was trained, and the SHA-256 of the weights
file); ``load_base()`` reads them and checks the digest, so results that record the digest
(``docs/results.json``) can tell which base they came from.
"""

from __future__ import annotations

import hashlib
import os

from ..io import FileFormatError, load_arrays, load_json, save_arrays, save_json
from ..quant import check_not_quantized
from .gpt import GPT, GPTConfig

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
BASE_WEIGHTS = os.path.join(ASSETS, "base.safetensors")
BASE_CONFIG = os.path.join(ASSETS, "base.json")


def save_model(model: GPT, weights_path, config_path, info: dict | None = None) -> None:
    """Write weights (safetensors) and a JSON file with the config and ``info``; both atomically.

    A model whose base is NF4 (``lora.quantize_base``) is refused: its W₀ is in no state_dict.
    """
    check_not_quantized(model, f"save_model({os.fspath(weights_path)!r})")
    save_arrays(weights_path, model.state_dict(), {"config": model.config.to_dict()})
    save_json(config_path, {"config": model.config.to_dict(), "info": info or {}, "sha256": file_sha256(weights_path)})


def file_sha256(path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def base_sha256() -> str:
    """The SHA-256 that ``base.json`` records for the shipped weights file."""
    return load_json(BASE_CONFIG).get("sha256", "") if os.path.exists(BASE_CONFIG) else ""


def load_model(weights_path, config_path=None, dtype=None, backend=None) -> GPT:
    """Build a GPT from a weights file (the config is read from its metadata or ``config_path``)."""
    arrays, meta = load_arrays(weights_path)
    cfg = meta.get("config")
    if cfg is None:
        if config_path is None or not os.path.exists(config_path):
            raise FileFormatError(f"{weights_path}: no model config in the file and no config JSON given")
        cfg = load_json(config_path)["config"]
    model = GPT(GPTConfig.from_dict(cfg), init_weights=False)  # every weight is loaded next
    model.load_state_dict(arrays, source=os.fspath(weights_path))
    if dtype is not None or backend is not None:
        model.to(dtype=dtype, backend=backend)
    return model


def load_base(dtype=None, backend=None) -> GPT:
    """The shipped pre-trained base model ("a pre-trained model exists", as in the paper)."""
    if not os.path.exists(BASE_WEIGHTS):
        raise FileNotFoundError(
            f"the shipped base model is missing ({BASE_WEIGHTS}); regenerate it with `minilora pretrain`"
        )
    recorded, actual = base_sha256(), file_sha256(BASE_WEIGHTS)
    if recorded != actual:
        raise FileFormatError(
            f"{BASE_WEIGHTS}: its SHA-256 is {actual}, but {BASE_CONFIG} records {recorded or 'none'}; the two "
            "files come from different runs. Restore both from git, or write both with `minilora pretrain`"
        )
    return load_model(BASE_WEIGHTS, BASE_CONFIG, dtype=dtype, backend=backend)


def base_info() -> dict:
    return load_json(BASE_CONFIG).get("info", {}) if os.path.exists(BASE_CONFIG) else {}
