"""The bridge to PyTorch: Hugging Face GPT-2 checkpoints and PEFT LoRA adapters, in and out.

    from minilora import hf
    model = hf.load_gpt2("path/to/gpt2-dir")                  # config.json + model.safetensors (or sharded)
    hf.save_gpt2("out-dir", model)                            # GPT2LMHeadModel.from_pretrained loads it
    hf.save_peft_adapter("adapter-dir", model, "default")     # PeftModel.from_pretrained loads it
    hf.load_peft_adapter("adapter-dir", model, "imported")    # a PEFT GPT-2 LoRA adapter, made active
    tok = hf.load_tokenizer("path/to/gpt2-dir")               # tokenizer.json (pip install 'minilora[hf]')
    report = hf.analyze_adapter("llama-adapter", base="llama-dir")  # Sec. 7 on a PEFT LoRA of any architecture

NumPy + safetensors + json only: nothing here imports torch or transformers, and no pickle is
ever read. Files: ``checkpoint`` (GPT-2 folders), ``peft`` and ``peft_import`` (adapters out and in), ``tokenizer``,
``analyze`` (Sec. 7 on a PEFT LoRA folder of any architecture, read by tensor name), ``commands`` (the ``export``, ``import-peft``, ``analyze`` and ``finetune --base`` commands);
tutorial 08's checks live in ``minilora.exercises.interop``.
"""

from .analyze import analyze_adapter, read_lora_adapter  # noqa: F401
from .checkpoint import HFFormatError, load_gpt2, save_gpt2  # noqa: F401
from .peft import save_peft_adapter  # noqa: F401
from .peft_import import load_peft_adapter, read_peft_adapter  # noqa: F401
from .tokenizer import HFTokenizer, load_tokenizer  # noqa: F401
