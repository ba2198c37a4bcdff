"""Benchmarks, each a function returning a dict with what it ran on (device, versions, dtype, config) and medians/p95
of measured times (CUDA events or a synchronised host clock on a GPU, `perf_counter` on the CPU). `vstream bench`
(vstream/cli/bench.py) checks the options, runs them and prints their results; nothing here parses options or prints.

- `harness`: what they share: `environment`, `load_bench_model` (a preset with random weights built directly on the
  target device, no CPU initialisation), `time_ms`, `summary`, `gpu_memory`.
- `memory`: per-frame STAR memory update at growing stream lengths (paper mode, a CUDA graph on a GPU unless turned
  off), the official algorithm's update and its growing-buffer copy as anchors, and the device memory of the whole
  model (answering at each length) from 10^2 to 10^5 frames.
- `encode`: vision tower frames/s at several batch sizes: the full transformers tower reading hidden state -2
  (anchor), the truncated tower, and the fast path (fused forward, CUDA graphs).
- `answer`: question -> first token for a prompt of a given length, and decode ms/token: the fast path, the eager
  path and transformers `generate` (anchors), with the greedy tokens compared.
- `streams`: N simulated live 1-fps streams on one model, questions at intervals (p95 time to first token); one file
  ingested offline, then replayed live with questions (`stream_benchmark`).
- `ceilings` and `profile`: the device's measured matrix-product rate and copy bandwidth, and torch.profiler tables
  of the fast path's hot calls (CUDA only), for `vstream bench all`.

This package re-exports the names of those modules; the benchmarks that need more than torch and transformers are
imported from their own module by their command.
"""

from vstream.bench.answer import answer_benchmark
from vstream.bench.ceilings import ceilings
from vstream.bench.encode import encode_benchmark, tower_gflop
from vstream.bench.harness import device_name, environment, gpu_memory, load_bench_model, summary, sync, time_ms
from vstream.bench.memory import memory_benchmark, official_anchor
from vstream.bench.profile import profile_tables
from vstream.bench.streams import stream_benchmark, streams_benchmark

__all__ = ["answer_benchmark", "ceilings", "device_name", "encode_benchmark", "environment", "gpu_memory",
           "load_bench_model", "memory_benchmark", "official_anchor", "profile_tables", "stream_benchmark",
           "streams_benchmark", "summary", "sync", "time_ms", "tower_gflop"]
