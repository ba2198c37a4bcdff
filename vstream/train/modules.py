"""What the trainer optimises: a batch in, a loss out.

`MemoryQAModule` wraps a `FlashVStream`: it finishes each example's memory (abstract slots recomputed with autograd,
then the rest of the snapshot), projects it, splices it at the `<image>` position exactly as inference does
(`FlashVStream.prompt_embeds`), and takes the LLM's next-token loss on the supervised answer tokens. A batch with
`segments` (questions packed over one memory, `vstream.train.watch_data`) runs each packed question as if asked
alone (`packed_attention`: it sees the shared part and itself, at the positions it would have alone). On the CPU a
shared part's KV cache repeated for each question costs more than the masked attention over the whole sequence.
`TowerPretrainModule` trains a vision tower from scratch with per-patch class targets.
"""

from __future__ import annotations

import torch
from torch import nn

from vstream.memory.star import abstract_slots
from vstream.model.prompts import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vstream.model.splice import splice
from vstream.model.vlm import FlashVStream
from vstream.train.watch_data import packed_attention


class MemoryQAModule(nn.Module):
    def __init__(self, model: FlashVStream):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, lengths, rest, rest_lengths, abstract_inputs, abstract_lengths, segments=None):
        m = self.model
        cfg = m.cfg.memory
        k, p = cfg.abstract_length, cfg.abstract_size**2
        dtype = m.dtype
        slots = abstract_slots(m.attention_model, abstract_inputs.to(dtype), abstract_lengths, cfg)  # [B, K, P, D]
        memories = []
        for b in range(input_ids.shape[0]):
            n_abs = min(int(abstract_lengths[b]), k) * p
            memories.append(torch.cat([slots[b].flatten(0, 1)[:n_abs], rest[b, : int(rest_lengths[b])].to(dtype)]))
        vision = m.mm_projector(torch.cat(memories))  # one projector call for the whole batch
        vision = vision.split([x.shape[0] for x in memories])
        embed = m.llm.get_input_embeddings()
        seqs, labs = [], []
        for b in range(input_ids.shape[0]):
            ids, lab = input_ids[b, : int(lengths[b])], labels[b, : int(lengths[b])]
            if not bool((ids == IMAGE_TOKEN_INDEX).any()):  # a text-only conversation
                seqs.append(embed(ids.clamp_min(0)))
                labs.append(lab)
                continue
            seq, lab = splice(ids, embed, vision[b], labels=lab)  # one memory per conversation (splice checks)
            seqs.append(seq)
            labs.append(lab)
        segs = [None] * len(seqs)
        if segments is not None:  # the memory's tokens join the shared part: segment 0 comes first
            segs = [torch.cat([segments.new_zeros(q.shape[0] - int(lengths[b])), segments[b, : int(lengths[b])]])
                    for b, q in enumerate(seqs)]
        packed = [b for b, s in enumerate(segs) if s is not None and bool((s > 0).any())]
        plain = [b for b in range(len(seqs)) if b not in packed]
        # On the CPU each sequence runs alone: its cost is per token there, and padding would be pure waste.
        groups = [[b] for b in plain] if seqs[0].device.type == "cpu" else [plain] if plain else []
        total, count = 0.0, 0
        for group in groups:
            loss, n = self._loss([seqs[b] for b in group], [labs[b] for b in group])
            total, count = total + loss, count + n
        for b in packed:  # alone: the packed attention mask spans one sequence's square, padding would add to it
            loss, n = self._loss([seqs[b]], [labs[b]], [segs[b]])
            total, count = total + loss, count + n
        loss = total / max(count, 1)
        # A batch of short streams (fewer frames than abstract slots) never runs the attention; a zero-weighted term
        # keeps its parameters in the graph so that data-parallel gradient reduction sees the same parameters each step.
        idle = sum(p.sum() for p in m.attention_model.parameters() if p.requires_grad)
        return {"loss": loss + 0.0 * idle}

    def _causal(self):
        llm = self.model.llm
        return llm.get_base_model() if hasattr(llm, "get_base_model") else llm  # a peft model's LoRA'd LLM

    def _loss(self, seqs, labs, segs=None) -> tuple[torch.Tensor, int]:
        """(sum of the next-token losses over the supervised tokens, their number) of right-padded sequences (with
        `segs`: packed ones, under `packed_attention`)."""
        causal = self._causal()
        longest = max(q.shape[0] for q in seqs)
        embeds = seqs[0].new_zeros(len(seqs), longest, seqs[0].shape[-1])
        mask = torch.zeros(len(seqs), longest, dtype=torch.long, device=embeds.device)
        target = torch.full((len(seqs), longest), IGNORE_INDEX, dtype=torch.long, device=embeds.device)
        for b, (q, lab) in enumerate(zip(seqs, labs)):
            embeds[b, : q.shape[0]] = q
            mask[b, : q.shape[0]] = 1
            target[b, : q.shape[0]] = lab
        extra = {"attention_mask": mask}
        if segs is not None:
            eager = causal.config._attn_implementation == "eager"
            extra["attention_mask"], extra["position_ids"] = packed_attention(segs, longest, boolean=not eager,
                                                                              dtype=embeds.dtype)
            extra = {k: v.to(embeds.device) for k, v in extra.items()}
        hidden = causal.get_decoder()(inputs_embeds=embeds, use_cache=False, **extra).last_hidden_state  # [B, L, H]
        return self._supervised(causal, hidden, target)

    @staticmethod
    def _supervised(causal, hidden, target) -> tuple[torch.Tensor, int]:
        """(summed cross-entropy, count) of the next tokens that are supervised; the vocabulary's logits are made at
        those positions only (a few answer tokens per question)."""
        shifted = target[:, 1:]
        where = shifted != IGNORE_INDEX
        logits = causal.get_output_embeddings()(hidden[:, :-1][where]).float()  # [n, V]
        return nn.functional.cross_entropy(logits, shifted[where], reduction="sum"), int(where.sum())


class TowerPretrainModule(nn.Module):
    """Vision tower + a linear per-patch classifier (soft targets: the share of each class in the patch) + a linear
    frame classifier on the mean feature (the background)."""

    def __init__(self, tower, patch_classes: int, frame_classes: int):
        super().__init__()
        self.tower = tower
        dim = tower.cfg.hidden_size
        self.patch_head = nn.Linear(dim, patch_classes)
        self.frame_head = nn.Linear(dim, frame_classes)

    def forward(self, pixel_values, patch_targets, frame_targets):
        features = self.tower(pixel_values)  # [B, grid^2, D]
        patch_logp = torch.log_softmax(self.patch_head(features).float(), dim=-1)
        patch_loss = -(patch_targets * patch_logp).sum(-1).mean()
        frame_loss = nn.functional.cross_entropy(self.frame_head(features.mean(1)).float(), frame_targets)
        return {"loss": patch_loss + frame_loss}
