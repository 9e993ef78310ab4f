"""Check functions for the exercises of the tutorials (``tutorials/*.py``), with hints and solutions.

Each tutorial ends with one to three exercises. You write a small function, then hand it to
the matching check, which compares it with minilora itself (and, for backward passes, runs
``ml.gradcheck`` on it)::

    from minilora.exercises import check_dA, show_hint, show_solution

    def my_dA(x, lora_A, lora_B, grad_h, scaling):
        ...                      # your formula, on NumPy arrays
    check_dA(my_dA)              # prints "✓ ..." and returns True, or raises ExerciseError

A right answer prints ✓ and returns True. A wrong one raises ``ExerciseError`` (an
AssertionError) whose message first diagnoses *your* answer ("your dA is 0.4× the right one
everywhere: did you drop the scaling s?"), then gives a hint that says where to look. The
formula comes only when you ask: ``check_dA(my_dA, hint_level=2)`` or ``show_hint("02.1", 2)``
(``hint_level=0``: the diagnosis alone). ``show_solution("02.1")`` prints a solution; the
solutions are not in the tutorials. ``minilora exercises --solutions`` prints the teacher's key
(``key.teacher_key()``: every solution, and the answers to the syllabus's predict questions).
An exercise you have not tried yet (its function still
raises ``NotImplementedError``) prints a reminder and returns None, so a tutorial runs from
top to bottom before you have done its exercises.

    id    tutorial             check
    01.1  01_autograd          check_backward_by_hand
    01.2                       check_sigmoid
    02.1  02_lora_layer        check_dA
    02.2                       check_dB
    02.3                       check_lora_param_count
    03.1  03_tiny_transformer  check_loss_mask
    03.2                       check_masked_loss
    04.1  04_finetune          check_optimizer_state_bytes
    04.2                       check_trainable_params
    05.1  05_merge_and_serve   check_merge
    05.2                       check_switch
    05.3                       check_mixed_batch
    06.1  06_what_rank         check_subspace_similarity
    06.2                       check_random_subspace_baseline
    07.1  07_gpu               check_softmax_any_backend
    07.2                       check_host_logits
    08.1  08_to_peft           check_pack_c_attn
    08.2                       check_block_B
    09.1  09_after_the_paper   check_dora_dm
    09.2                       check_pissa_init
    09.3                       check_nf4_bytes

One module per tutorial (``autograd``, ``lora_layer``, ``transformer``, ``finetune``, ``serve``,
``rank``, ``gpu``, ``interop``, ``variants``) holds its checks, hints and solutions; ``harness`` the shared machinery and
the two figure helpers the tutorials use, ``output_dir()`` and ``save_figure(fig, name)``; ``key`` the teacher's key.
"""

from .autograd import check_backward_by_hand, check_sigmoid
from .finetune import check_optimizer_state_bytes, check_trainable_params
from .gpu import check_host_logits, check_softmax_any_backend
from .interop import check_block_B, check_pack_c_attn
from .harness import ExerciseError, exercises, output_dir, save_figure, show_hint, show_solution, solution
from .lora_layer import check_dA, check_dB, check_lora_param_count
from .rank import check_random_subspace_baseline, check_subspace_similarity
from .serve import check_merge, check_mixed_batch, check_switch
from .transformer import check_loss_mask, check_masked_loss
from .variants import check_dora_dm, check_nf4_bytes, check_pissa_init

__all__ = [
    "ExerciseError",
    "check_backward_by_hand",
    "check_block_B",
    "check_dA",
    "check_dB",
    "check_dora_dm",
    "check_host_logits",
    "check_lora_param_count",
    "check_loss_mask",
    "check_masked_loss",
    "check_merge",
    "check_mixed_batch",
    "check_nf4_bytes",
    "check_optimizer_state_bytes",
    "check_pack_c_attn",
    "check_pissa_init",
    "check_random_subspace_baseline",
    "check_sigmoid",
    "check_softmax_any_backend",
    "check_subspace_similarity",
    "check_switch",
    "check_trainable_params",
    "exercises",
    "output_dir",
    "save_figure",
    "show_hint",
    "show_solution",
    "solution",
]
