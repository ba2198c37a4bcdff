"""The server's metrics as Prometheus text: per-stream frame counters and memory size labelled by stream id, open
streams, sockets and answers, the time to first token as a histogram, the watches' evaluations by how they ended and
the engine time of each watch tick (a histogram), the engine's queue and, on CUDA, the allocator's counters. Reading
them touches no device and takes no lock that an answer holds for long.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vstream.server.state import ServerState

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WATCH_TICK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
PER_STREAM = (("frames_ingested_total", "counter", "Frames encoded into the memory.", "ingested"),
              ("frames_received_total", "counter", "Frames read from the source or pushed.", "received"),
              ("frames_dropped_total", "counter", "Frames not ingested: over the target rate or behind.", "dropped"),
              ("memory_tokens", "gauge", "Tokens in the stream's memory.", "memory_tokens"))


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count); thread-safe."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts = buckets, [0] * len(buckets)
        self.sum, self.count, self._lock = 0.0, 0, threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.sum += value
            self.count += 1
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        with self._lock:
            out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
            out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
            return out + [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


def render_metrics(state: ServerState) -> str:
    """Prometheus text exposition: per-stream counters and gauges labelled by stream id, server-wide TTFT."""
    stats = {}
    for sid, s in list(state.streams.items()):
        snap = s.session.snapshot()
        stats[sid] = s.counts() | {"memory_tokens": 0 if snap is None else snap.memory.num_tokens}
    lines = []
    for name, kind, help_text, key in PER_STREAM:
        lines += _header(name, kind, help_text)
        lines += [f'vstream:{name}{{stream_id="{sid}"}} {st[key]}' for sid, st in stats.items()]
    lines += sample("num_streams", "gauge", "Open streams.", len(stats))
    lines += sample("num_requests_running", "gauge", "Answers being generated.", state.running)
    lines += sample("num_realtime_sessions", "gauge", "Open WebSocket sessions.", len(state.sockets))
    lines += sample("requests_cancelled_total", "counter",
                     "Answers stopped before their end (disconnect or cancel).", state.answers_cancelled)
    lines += _header("time_to_first_token_seconds", "histogram", "Request received to first answer piece.")
    lines += state.ttft.lines("vstream:time_to_first_token_seconds")
    if state.watcher is not None:
        lines += _watch_lines(state.watcher)
    engine = state.engine
    if engine is not None:
        lines += sample("engine_answers_pending", "gauge", "Answers waiting for a slot, prefilling or decoding.",
                         engine.pending_answers)
        lines += sample("engine_rounds_total", "counter", "Rounds of frames the engine ran (all streams together).",
                         engine.rounds)
        lines += _header("engine_busy_seconds_total", "counter", "The engine thread's wall time in rounds of frames "
                         "and in answer iterations (waits for the device included).")
        lines += [f'vstream:engine_busy_seconds_total{{work="{k}"}} {v:.6f}' for k, v in engine.seconds.items()]
        stats = engine.stats()
        lines += sample("engine_answer_slots", "gauge", "Answers decoded together at most (KV-cache slots).",
                         stats["answer_slots"])
        lines += sample("engine_memory_page_updates_total", "counter", "Batched memory updates run by memory pages.",
                         stats["memory_page_updates"])
        if "tower_calls" in stats:  # Qwen streams
            lines += sample("engine_tower_calls_total", "counter", "Tower calls encoding Qwen streams' units.",
                             stats["tower_calls"])
            lines += sample("engine_tower_units_total", "counter", "Qwen streams' units those calls encoded.",
                             stats["tower_units"])
    device = state.model.device
    if device.type == "cuda":  # the allocator's own counters: no device synchronisation
        import torch

        lines += sample("gpu_memory_allocated_bytes", "gauge", "GPU memory held by tensors.",
                         torch.cuda.memory_allocated(device))
        lines += sample("gpu_memory_reserved_bytes", "gauge", "GPU memory reserved by the caching allocator.",
                         torch.cuda.memory_reserved(device))
    return "\n".join(lines) + "\n"


def _watch_lines(watcher) -> list[str]:
    """The Watcher's evaluations by how they ended, the engine time of its ticks, and the streams they scored."""
    lines = _header("watch_evaluations_total", "counter", "Watch evaluations by how they ended: decided by the "
                    "memory's recent part (recent), escalated to the full memory (escalated), scored on the full "
                    "memory at once (full), failed.")
    lines += [f'vstream:watch_evaluations_total{{scored="{k}"}} {v}' for k, v in sorted(watcher.evaluations.items())]
    lines += _header("watch_tick_seconds", "histogram", "Engine time of one tick's watch scoring (every stream's due "
                     "watches in one call).")
    lines += watcher.tick_seconds.lines("vstream:watch_tick_seconds")
    return lines + sample("watch_streams_scored_total", "counter", "Streams with due watches, summed over the ticks "
                           "(watch_tick_seconds_sum over it: the scoring time of one stream).", watcher.streams_scored)


def _header(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP vstream:{name} {help_text}", f"# TYPE vstream:{name} {kind}"]


def sample(name: str, kind: str, help_text: str, value) -> list[str]:
    """One unlabelled metric: its HELP and TYPE lines and its value."""
    return _header(name, kind, help_text) + [f"vstream:{name} {value}"]
