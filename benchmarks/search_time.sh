#!/usr/bin/env bash
# Wall time of the main GPU job (issue #15):
#   coqat search --space lm-30m --budget w3a3 --baselines uniform
# compiled (the default on CUDA), then the same command eager (--compile off) for as long as
# LIMIT_EAGER seconds allow, so that its FP-phase losses can be compared at equal steps.
# Usage: OUT=dir bash benchmarks/search_time.sh   (results in $OUT/search_time/)
# SPACE / BUDGET change the job (a CPU smoke test: SPACE=tests/fixtures/lm-micro.toml).
set -uo pipefail
OUT=${OUT:-reports_tmp}
LIMIT_COMPILED=${LIMIT_COMPILED:-360}
LIMIT_EAGER=${LIMIT_EAGER:-150}
SPACE=${SPACE:-lm-30m}
BUDGET=${BUDGET:-w3a3}
dest="$OUT/search_time"
mkdir -p "$dest"
PY=${PYTHON:-python3}
$PY - > "$dest/env.json" <<'PY'
import json, platform, torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = None
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__,
                  "triton": tv,
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))
PY
run() {  # name limit extra-args...
  local name=$1 limit=$2; shift 2
  local t0 t1 rc
  t0=$(date +%s.%N)
  timeout "$limit" $PY -m coqat search --space "$SPACE" --budget "$BUDGET" --baselines uniform \
      --out "$dest/runs-$name" --json "$@" > "$dest/$name.json" 2> "$dest/$name.stderr"
  rc=$?
  t1=$(date +%s.%N)
  $PY -c "import json,sys; print(json.dumps({'run': '$name', 'rc': $rc, 'wall_s': $t1 - $t0, 'limit_s': $limit, 'args': sys.argv[1:]}))" "$@" >> "$dest/times.jsonl"
}
run compiled "$LIMIT_COMPILED"
run eager "$LIMIT_EAGER" --compile off
# keep the records and metrics, not the weights
find "$dest" \( -name '*.safetensors' -o -name '*.pt' -o -name '*.pth' \) -delete
cat "$dest/times.jsonl"
