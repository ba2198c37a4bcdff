"""Checks that need a CUDA device: the paper-mode memory update is free of host synchronisation, and official mode
matches the literal reference on the GPU (its random init comes from the CUDA generator there)."""

import random

import pytest
import torch

from vstream.config import MemoryConfig
from vstream.memory import AbstractAttention, PaperStarMemory
from vstream.memory.official import OfficialStreamingMemory
from vstream.memory.reference import RefOfficialStreaming

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the lent GPU)")

D = 1024  # CLIP ViT-L/14 width: the released memory shapes


def test_paper_update_and_read_never_synchronise():
    torch.manual_seed(0)
    att = AbstractAttention(D, 32).cuda().half()
    mem = PaperStarMemory(MemoryConfig(), D, att, 16, device="cuda", dtype=torch.float16)
    frames = torch.randn(400, 256, D, device="cuda", dtype=torch.float16)
    times = torch.arange(400, dtype=torch.float64, device="cuda")
    for i in range(30):  # past the fill phase, so every later update clusters, attends and retrieves
        mem.update(frames[i : i + 1], times[i : i + 1])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(30, 400):
            mem.update(frames[i : i + 1], times[i : i + 1])
        mem.update(frames[:5], times[:5] + 1000)  # a chunk too
        read = mem.read()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert read.num_tokens == 681
    assert read.temporal_weights.sum().item() == pytest.approx(405)


def test_cuda_graph_replay_equals_eager_updates_and_never_synchronises():
    torch.manual_seed(0)
    att = AbstractAttention(D, 32).cuda().half()
    eager = PaperStarMemory(MemoryConfig(), D, att, 16, device="cuda", dtype=torch.float16)
    graphed = PaperStarMemory(MemoryConfig(), D, att, 16, device="cuda", dtype=torch.float16)
    graphed.enable_cuda_graph()
    frames = torch.randn(420, 256, D, device="cuda", dtype=torch.float16)
    times = torch.arange(420, dtype=torch.float64, device="cuda")
    for i in range(40):  # fill, then the first steady update captures the graph
        for mem in (eager, graphed):
            mem.update(frames[i : i + 1], times[i : i + 1])
    assert graphed.graph.graph is not None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(40, 420):
            for mem in (eager, graphed):
                mem.update(frames[i : i + 1], times[i : i + 1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    a, b = eager.read(), graphed.read()
    torch.testing.assert_close(b.tokens, a.tokens)
    assert torch.equal(b.temporal_weights, a.temporal_weights) and torch.equal(b.retrieved_times, a.retrieved_times)
    assert graphed.frames_seen == 420 and int(graphed.count) == 420


@pytest.mark.parametrize("chunks", [[1] * 40, [3, 1, 5, 25, 2, 7]])
def test_official_streaming_matches_reference_on_cuda(chunks):
    cfg = MemoryConfig(mode="official")
    torch.manual_seed(0)
    att = AbstractAttention(64, 32).cuda()
    ref = RefOfficialStreaming(cfg, att)
    fast = OfficialStreamingMemory(cfg, 64, att, 16, device="cuda", dtype=torch.float32)
    x = torch.randn(sum(chunks), 256, 64, device="cuda")
    start = 0
    for i, n in enumerate(chunks):
        for impl in (ref, fast):
            torch.manual_seed(100 + i)
            random.seed(100 + i)
            impl.update(x[start : start + n])
        start += n
        torch.testing.assert_close(fast.read().tokens, ref.read(), atol=1e-4, rtol=1e-4)
