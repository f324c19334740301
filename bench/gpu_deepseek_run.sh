#!/usr/bin/env bash
# One GPU call: kernel/engine correctness checks, then the engine decode bench (JSON lines under $OUT).
#   bash bench/gpu_deepseek_run.sh [bench args...]
set -uo pipefail
OUT=${OUT:-/tmp/ds_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 240 python3 bench/gpu_deepseek_check.py --parts env,b,c --new 12 --v2lite-layers 0 --budget-s 0 \
    > "$OUT/check.jsonl" 2> "$OUT/check.err"
echo "check rc=$?"
grep -h '"part"' "$OUT/check.jsonl" | cut -c1-400
tail -5 "$OUT/check.err"
python3 bench/bench_deepseek.py --out "$OUT/bench.jsonl" "$@" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
grep -v '^#\|^ \|^-\|^Name\|^Self' "$OUT/bench.log" | grep -v '"name"' | tail -15
python3 - "$OUT/bench.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(r["name"], r["value"], r.get("range"), "ratio", r["ratio"], "roof", r.get("roofline_tok_s"))
PY
