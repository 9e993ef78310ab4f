"""The checks of tutorial 09 ("after the paper"): they live in ``minilora.exercises.variants``.

    from minilora.exercises_variants import check_dora_dm, check_pissa_init, check_nf4_bytes   # = minilora.exercises
"""

from .exercises.variants import check_dora_dm, check_nf4_bytes, check_pissa_init

__all__ = ["check_dora_dm", "check_nf4_bytes", "check_pissa_init"]
