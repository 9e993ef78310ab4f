"""The fine-tuning methods the paper compares (Hu et al. 2021, Sec. 5.1), installed into a GPT by one call.

    model = apply_method(model, "adapter_h", r=4)   # only the adapters (and LayerNorms) train
    model.num_parameters(trainable_only=True)       # |Θ|

    method      paper name   what trains                                  |Θ| (checked in the tests)
    full        FT           every weight (eq. 1)                         |Φ₀|
    ft_top2     FT^Top2      the last two blocks only                     2 blocks
    bitfit      BitFit       every bias (Linear and LayerNorm biases)     Σ biases
    adapter_h   Adapter^H    2 bottleneck adapters per block (Houlsby)    L̂_Adpt·(2·d·r + r + d) + 2·L̂_LN·d
                             + the block's LayerNorms                     with L̂_Adpt = L̂_LN = 2·n_layer
    adapter_l   Adapter^L    1 adapter after the MLP, behind its own      the same formula with
                             LayerNorm (Lin et al. 2020)                  L̂_Adpt = L̂_LN = n_layer
    preembed    PreEmbed     l_p prefix + l_i infix input vectors         d·(l_p + l_i)
    lora        LoRA         A and B of the adapted matrices (eq. 2)      2·L̂·d·r

Each new op is a ``Function`` with its hand-written backward beside its forward, like the
layers of ``minilora.functional``: ``bottleneck_adapter`` (down-projection, ReLU,
up-projection, residual; one fused op), ``insert_prompt_vectors`` and ``gather_positions``
(PreEmbed). ``HYPERPARAMS`` is the one table of hyper-parameters per method (AdamW's and the
method's own); ``minilora.recipes.finetune(task, method)`` trains with it.

    table.py      METHODS, PAPER_NAMES, HYPERPARAMS, TASK_HYPERPARAMS, hyperparams, lora_alpha
    adapters.py   the bottleneck adapter op, Adapter, AdaptedLinear (Adapter^H, Adapter^L)
    preembed.py   the PreEmbed ops, PromptVectors, PreEmbedGPT
    apply.py      apply_method (one function per method, the table APPLY), expected_trainable

Adapters start equal to the base model (the up-projection is 0, as LoRA's B), so a fine-tuning
run begins at the pre-trained model. PreEmbed cannot: inserting vectors changes the input.
PreEmbed also costs context: the l_p + l_i vectors occupy positions of the model's
``block_size``, so the ``PreEmbedGPT`` that ``apply_method`` returns has a ``config.block_size``
l_p + l_i smaller than the base's, and a sequence that does not fit raises an error that says so
(the paper, Sec. 3: "reserving a part of the sequence length for adaptation necessarily reduces
the sequence length available").
"""

from __future__ import annotations

from .adapters import AdaptedLinear, Adapter, BottleneckAdapter, bottleneck_adapter
from .apply import APPLY, OPTIONS, apply_method, expected_trainable, randomize_zero_init
from .preembed import GatherPositions, InsertPromptVectors, PreEmbedGPT, PromptVectors, gather_positions, insert_prompt_vectors
from .table import HYPERPARAMS, METHODS, PAPER_NAMES, TASK_HYPERPARAMS, TRAINING_KEYS, hyperparams, lora_alpha

__all__ = [
    "APPLY",
    "HYPERPARAMS",
    "METHODS",
    "OPTIONS",
    "PAPER_NAMES",
    "TASK_HYPERPARAMS",
    "TRAINING_KEYS",
    "AdaptedLinear",
    "Adapter",
    "BottleneckAdapter",
    "GatherPositions",
    "InsertPromptVectors",
    "PreEmbedGPT",
    "PromptVectors",
    "apply_method",
    "bottleneck_adapter",
    "expected_trainable",
    "gather_positions",
    "hyperparams",
    "insert_prompt_vectors",
    "lora_alpha",
    "randomize_zero_init",
]
