#!/usr/bin/env bash
# `vstream bench serve` against one `vstream serve` at several stream counts (the serve table of BENCHMARKS.md):
# the server starts once (its start-to-ready seconds are measured from the command's start), then each count runs
# its load through the real HTTP and WebSocket API and writes its JSON report.
#
#   OUT=dir MODEL=flash-vstream-7b STREAMS="1 8 32 64 128 256" LOAD_S=30 WARMUP_S=2 bash benchmarks/serve_sweep.sh
#
# SERVE_ARGS: more options of `vstream serve` (e.g. "--memory-page 64"); BENCH_ARGS: more of `vstream bench serve`
# (e.g. "--watches 1": one standing question per stream on top of the question load).
# WARMUP_S: seconds of frames before the first question (at 1 fps a memory reaches its steady state, where updates
# replay a captured graph, after about temporal_length frames).
set -euo pipefail
OUT=${OUT:-benchmarks/results/serve}
MODEL=${MODEL:-flash-vstream-7b}
STREAMS=${STREAMS:-"1 8 32 64 128 256"}
LOAD_S=${LOAD_S:-30}
PORT=${PORT:-8765}
mkdir -p "$OUT"
start=$(date +%s.%N)
python3 -m vstream serve --model "$MODEL" --device "${DEVICE:-auto}" --port "$PORT" --max-streams 2048 ${SERVE_ARGS:-} \
  > "$OUT/serve.log" 2>&1 &
server=$!
trap 'kill -INT $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
python3 - "$PORT" "$start" "$OUT/ready.json" "$server" "${START_TIMEOUT:-600}" <<'PY'
import json, os, sys, time, urllib.request
port, start, out, pid, limit = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
while True:
    try:
        alive = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        alive = False
    if not alive or time.time() - start > limit:
        sys.exit(f"the server exited, or was not ready within {limit} s: see serve.log")
    try:
        body = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2))
        break
    except Exception:
        time.sleep(0.2)
body["start_to_ready_s"] = round(time.time() - start, 2)
json.dump(body, open(out, "w"))
print("ready:", body)
PY
cpu_s() {  # CPU seconds (user + system) the server has used so far
  python3 -c "import os,sys; f=open(f'/proc/{sys.argv[1]}/stat').read().rsplit(')',1)[1].split(); print((int(f[11])+int(f[12]))/os.sysconf('SC_CLK_TCK'))" "$server"
}
for n in $STREAMS; do
  cpu0=$(cpu_s); t0=$(date +%s.%N)
  python3 -m vstream bench serve --url "http://127.0.0.1:$PORT" --streams "$n" --seconds "$LOAD_S" \
    --warmup "${WARMUP_S:-2}" --json ${BENCH_ARGS:-} \
    > "$OUT/serve-$n.json"
  python3 - "$OUT/serve-$n.json" "$n" "$cpu0" "$(cpu_s)" "$t0" "$(date +%s.%N)" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); q, f = r["questions"], r["frames"]
cpu0, cpu1, t0, t1 = map(float, sys.argv[3:7])
r["server_cpu_cores_whole_run"] = round((cpu1 - cpu0) / (t1 - t0), 2)  # warm-up and load, the server process
json.dump(r, open(sys.argv[1], "w"), indent=1)
fc, done = q["first_chunk_ms"], q.get("done_ms") or q.get("last_chunk_ms") or {}
print(f"{sys.argv[2]:>4} streams: questions {q['status']}, first chunk p50 {fc.get('median_ms')} p95 {fc.get('p95_ms')} "
      f"max {fc.get('max_ms')} ms; last p95 {done.get('p95_ms')} ms; frames sent {f['sent']} ingested {f['ingested']} "
      f"dropped {f['dropped']}; health p95 {r['health_live'].get('p95_ms')} ms; server CPU "
      f"{r['server_cpu_cores_whole_run']} cores; engine busy {r.get('engine_busy')}")
PY
  if [ -n "${VSTREAM_STACKS:-}" ]; then sleep 11; cp "$VSTREAM_STACKS" "$OUT/stacks-after-$n.txt"; fi  # cumulative
done
