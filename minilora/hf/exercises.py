"""The checks of tutorial 08 ("from minilora to PEFT"): they live in ``minilora.exercises.interop``.

    from minilora.hf.exercises import check_pack_c_attn, check_block_B   # = minilora.exercises
"""

from ..exercises.interop import check_block_B, check_pack_c_attn

__all__ = ["check_block_B", "check_pack_c_attn"]
