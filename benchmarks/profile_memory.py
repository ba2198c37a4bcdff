"""torch.profiler tables of the steady paper-mode memory update (released shapes, fp16): graph replays and one eager
update, to see which kernels the ~1.1 ms goes to. Usage: PYTHONPATH=. python benchmarks/profile_memory.py > table.txt"""

import torch
from torch.profiler import ProfilerActivity, profile

from vstream.config import MemoryConfig
from vstream.memory import AbstractAttention, PaperStarMemory

torch.manual_seed(0)
att = AbstractAttention(1024, 32).cuda().half()
mem = PaperStarMemory(MemoryConfig(), 1024, att, 16, device="cuda", dtype=torch.float16)
mem.enable_cuda_graph()
frames = torch.randn(64, 256, 1024, device="cuda", dtype=torch.float16)
times = torch.arange(1000, dtype=torch.float64, device="cuda")
for i in range(40):
    mem.update(frames[i % 64 : i % 64 + 1], times[i : i + 1])
torch.cuda.synchronize()
for name, graph in (("graph replays (50 updates)", mem.graph), ("eager (50 updates)", None)):
    mem.graph = graph
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for i in range(50):
            mem.update(frames[i % 64 : i % 64 + 1], times[100 + i : 101 + i])
        torch.cuda.synchronize()
    print(f"== {name}")
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=30))
