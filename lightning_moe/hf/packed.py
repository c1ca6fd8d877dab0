"""A Hugging Face model's forward over packed rows, each example attending only to itself.

transformers tells the examples of a row apart by ``position_ids`` that restart at 0
(``masking_utils.find_packed_sequence_indices``): for ``sdpa``, ``eager`` and
``flex_attention`` it builds the block-diagonal causal mask from them when no attention mask
and no cache are passed. Flash-attention takes no mask: it reads the restarts as
``cu_seqlens``, but only when the batch is one row (``_is_packed_sequence`` checks
``batch_size == 1``), so for it the rows are laid end to end into one (each row starts at
position 0, so rows stay apart too), as TRL's ``padding_free`` does.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_moe.data.packing import position_ids_of


def packed_forward(model: nn.Module, batch: tuple[Tensor, ...], **kwargs: Any) -> Any:
    """``model(input_ids=batch[0], **kwargs)``, with the batch's ``position_ids`` when its rows are packed."""
    input_ids, position_ids = batch[0], position_ids_of(batch)
    if position_ids is None:
        return model(input_ids=input_ids, **kwargs)
    if "flash" not in str(getattr(model.config, "_attn_implementation", "")):
        return model(input_ids=input_ids, position_ids=position_ids, **kwargs)
    rows, seq_len = input_ids.shape
    out = model(input_ids=input_ids.reshape(1, -1), position_ids=position_ids.reshape(1, -1), **kwargs)
    out.logits = out.logits.reshape(rows, seq_len, -1)
    return out
