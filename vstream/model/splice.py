"""The one splice of a memory into a prompt, used by every answer path and by training.

The prompt's ids hold the `<image>` placeholder (`IMAGE_TOKEN_INDEX`) exactly once. The placeholder is expanded to
the memory's N positions and the projected memory is scattered into them (a masked scatter), so the result is the
text's embeddings with the memory in the placeholder's place: [S - 1 + N, H]. A prompt with another number of
placeholders, or a memory of another width than the LLM's, is an error that names both counts.

What this module does not do: build or tokenise prompts (`vstream.model.prompts`), or project the memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vstream.model.prompts import IGNORE_INDEX, IMAGE_TOKEN_INDEX


def splice(ids: Sequence[int] | torch.Tensor, embed: nn.Embedding, memory: torch.Tensor,
           labels: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """ids [S] with one `IMAGE_TOKEN_INDEX`, memory [N, H] already projected -> embeds [S - 1 + N, H] in the
    embedding's dtype; with `labels` [S], also the labels with `IGNORE_INDEX` over the memory's positions.

    Host ids (a list) are counted on the host and copied to the device once; device ids are counted there (one read)."""
    n, width = memory.shape[0], embed.embedding_dim
    if memory.dim() != 2 or memory.shape[1] != width:
        raise ValueError(f"the memory must be [N, {width}] (projected to the LLM's width), got {list(memory.shape)}")
    if isinstance(ids, torch.Tensor):
        count = int((ids == IMAGE_TOKEN_INDEX).sum())
        ids = ids.to(embed.weight.device)
    else:
        count = list(ids).count(IMAGE_TOKEN_INDEX)
        host = torch.tensor(list(ids), dtype=torch.long)
        cuda = embed.weight.device.type == "cuda"
        ids = (host.pin_memory() if cuda else host).to(embed.weight.device, non_blocking=cuda)
    if count != 1:
        raise ValueError(f"the prompt holds {count} <image> placeholders for the memory's {n} tokens: expected exactly "
                         "one placeholder")
    is_image = ids == IMAGE_TOKEN_INDEX
    repeats = torch.where(is_image, n, 1)
    expanded = torch.repeat_interleave(ids, repeats, output_size=ids.shape[0] - 1 + n)  # [S - 1 + N]
    where = (expanded == IMAGE_TOKEN_INDEX)[:, None]  # the memory's positions
    embeds = embed(expanded.clamp_min(0)).masked_scatter(where, memory.to(embed.weight.dtype))
    if labels is None:
        return embeds
    spliced = torch.repeat_interleave(labels, repeats, output_size=embeds.shape[0])
    return embeds, spliced.masked_fill(where[:, 0], IGNORE_INDEX)
