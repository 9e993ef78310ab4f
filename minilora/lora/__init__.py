"""LoRA (Hu et al. 2021, arXiv 2106.09685): h = W₀x + (α/r)·B A x with W₀ frozen.

    from minilora import lora
    cfg = lora.LoRAConfig(r=4, alpha=32, target_modules=("q", "v"))
    lora.apply_lora(model, cfg, adapter_name="e2e")   # q and v of every block become LoRALinear
    lora.mark_only_lora_as_trainable(model)           # only A and B train (eq. 2)
    print(lora.trainable_summary(model))              # |Θ| = 2 × L̂ × d_model × r
    lora.merge(model); lora.unmerge(model)            # W0 + BA for serving, and back, bit-exact
    lora.save_adapter("e2e.safetensors", model, "e2e"); lora.load_adapter("e2e.safetensors", base)
    with lora.mixed_batch(model, ["e2e", "parse", "__base__"]):   # one adapter per row: a mixed-task batch
        logits = model(idx)                                      # (any Module with LoRALinear layers)

Files: ``function`` (THE equation h = W₀x + (α/r)·B·A·x: the fused op and its backward),
``config`` (LoRAConfig), ``layer`` (LoRALinear and its adapters), ``mixed`` (mixed batches:
grouping rows by adapter, ``mixed_batch``) and ``mixed_op`` (their op, one adapter per row group),
``model`` (apply, freeze, count, merge), ``bias`` (an adapter's own bias deltas), ``files``
(adapter files). ``minilora.functional.lora_linear`` calls ``function.lora_linear``.
Beyond the paper: DoRA (``LoRAConfig(use_dora=True)``; ``dora``: its op, and ``DoRAVariant``, the
parts a layer asks of a DoRA adapter through the interface in ``variant``), PiSSA
(``init="pissa"``; ``variants.pissa_to_lora``), rsLoRA (``use_rslora``), and a 4-bit NF4 base
(``qlora.quantize_base``, QLoRA; the NF4 format and weight in ``minilora.quant``, the layers on it in
``quantized``).
"""

from .bias import BiasDeltas  # noqa: F401
from .config import BASE_ADAPTER, BIAS_MODES, INIT_MODES, MAX_DROPOUT, MAX_SCALING, LoRAConfig  # noqa: F401
from .files import AdapterFileError, adapter_nbytes, load_adapter, save_adapter  # noqa: F401
from .layer import AdapterDict, LoRALinear, MergedWeightChangedWarning  # noqa: F401
from .dora import DoRALinearFn, dora_linear  # noqa: F401
from .function import LoRALinearFn, delta_weight, lora_linear  # noqa: F401
from .mixed_op import MixedLoRALinearFn, mixed_lora_linear  # noqa: F401
from .mixed import RowGroups, group_rows, mixed_batch  # noqa: F401
from .variants import pissa_to_lora  # noqa: F401
from .quantized import NF4Linear, QuantizedWeight, nf4_linear  # noqa: F401
from .qlora import QuantizationReport, quantize_base  # noqa: F401
from .model import (  # noqa: F401
    MergeWarning,
    TrainableSummary,
    adapter_unchanged,
    apply_lora,
    bias_delta_names,
    delete_adapter,
    disable_adapters,
    get_adapter_config,
    list_adapters,
    load_base_state_dict,
    lora_layers,
    lora_parameter_names,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge,
    merge_and_unload,
    resolve_targets,
    set_adapter,
    trainable_summary,
    unmerge,
)
