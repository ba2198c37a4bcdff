"""LoRA on a tiny Flash-VStream-Qwen model for a few steps on the CPU: memories from the streaming code, the loss falls,
only the adapters move, and the learned factors merged into a fresh copy of the LLM give the adapted model's logits."""

import numpy as np
import torch

import vstream
from vstream.model.loading import merge_lora
from vstream.train.qwen_lora import QwenExample, add_lora, answer_loss, example_memory, lora_factors, train_lora


def clip(seed, n=8):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (84, 112, 3), dtype=np.uint8) for _ in range(n)], [float(t) for t in range(n)]


def test_lora_steps_lower_the_loss_and_merge_into_the_llm():
    model = vstream.load("tiny-qwen2.5-vl", device="cpu")
    base = {k: v.clone() for k, v in model.hf.state_dict().items()}
    examples = [QwenExample(*clip(0), "What is there?", "A red ball."),
                QwenExample(*clip(1), "What moved?", "The blue square.")]
    trainable = add_lora(model, rank=4, alpha=8.0)
    assert all(p.requires_grad for p in trainable) and not model.hf.lm_head.weight.requires_grad
    memories = [example_memory(model, ex) for ex in examples]
    assert all(m.num_tokens > 0 and m.frames_seen == 8 for m in memories)
    with torch.no_grad():
        before = [float(answer_loss(model, m, ex.question, ex.answer)) for m, ex in zip(memories, examples)]
    losses = train_lora(model, examples, steps=12, lr=5e-3)
    with torch.no_grad():
        after = [float(answer_loss(model, m, ex.question, ex.answer)) for m, ex in zip(memories, examples)]
    assert len(losses) == 12 and all(a < b for a, b in zip(after, before)), (before, after)
    now = {k.replace(".base_layer.", "."): v for k, v in model.hf.state_dict().items() if "lora_" not in k}
    assert now.keys() == base.keys()
    assert [k for k in base if not torch.equal(now[k], base[k])] == []  # tower, merger, LLM and head untouched
    factors = lora_factors(model)
    assert len(factors) == 2 * 4 * 2 and all(k.startswith("layers.") for k in factors)  # 2 layers x 4 projections

    fresh = vstream.load("tiny-qwen2.5-vl", device="cpu")  # the same seed: the same base weights
    merge_lora(fresh.hf.model.language_model, factors, scale=8.0 / 4)
    with torch.no_grad():
        embeds, pos = model.prompt(memories[0], "What is there?")
        want = model.hf.lm_head(model.hf.model.language_model(inputs_embeds=embeds, position_ids=pos)
                                .last_hidden_state)
        got = fresh.hf.lm_head(fresh.hf.model.language_model(inputs_embeds=embeds, position_ids=pos)
                               .last_hidden_state)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
