#!/usr/bin/env bash
# The GPU runs behind docs/benchmarks.md, on a lent 2-GPU machine (no network) with the vLLM kit of
# shared/tools/gpu-vllm (MOE=1, 3 parts) carried in .gpukit0..3, hpcinfer's pure-Python wheels
# in .gpudeps (hydra-core, omegaconf, antlr4, submitit, cloudpickle) and py-spy's in .gpuspy (stack
# dumps of a hung run). One step per command, each within 30 s of the previous one (the machine
# keeps /tmp while it stays up):
#   bash bench/gpu_runs.sh deps      # carry .gpukit0 .gpukit1 .gpudeps
#   bash bench/gpu_runs.sh part      # carry .gpukit0 .gpukit2
#   bash bench/gpu_runs.sh last      # carry .gpukit0 .gpukit3 .gpuspy: the kit is complete
#   bash bench/gpu_runs.sh moe       # MoE EP lockstep, MoE without EP
#   bash bench/gpu_runs.sh moe-uneven # MoE EP lockstep where one rank runs out of work long before the other
#   bash bench/gpu_runs.sh span      # a tp=2 replica spanning two "nodes" (one GPU each)
#   bash bench/gpu_runs.sh submit NAME OVERRIDES...  # any other layout, e.g. on 4 GPUs:
#        submit moe-ep-tp2 model=tiny_moe ep=true dp=2 tp=2
#   bash bench/gpu_runs.sh balance   # the skewed-workload benchmark at dp=2 (1B random Llama)
set -u
source .gpukit0/device_kit.sh
export PYTHONPATH=/tmp/hdeps:$PWD:${PYTHONPATH:-} HPCINFER_CACHE=/tmp/hc
O=${OUT:-/tmp/out}; mkdir -p "$O"
common="data.demo_rows=512 sampling=greedy sampling.max_tokens=64 engine.gpu_memory_utilization=0.4 engine.max_model_len=512"
show() {  # show NAME RUN_DIR: result rows, order, per-rank rows, and what the rank logs say about EP/DP
  python3 - "$1" "$2" <<'PY'
import json, sys, pathlib
import pyarrow.parquet as pq
name, rd = sys.argv[1], pathlib.Path(sys.argv[2])
s = json.loads((rd / "summary.json").read_text())
t = pq.read_table(rd / "results.parquet")
ids = t.column("id").to_pylist() if "id" in t.column_names else list(range(t.num_rows))
print(f"RESULT {name}: rows {t.num_rows} (summary {s['rows']}), in order {ids == sorted(ids)}, unique {len(set(ids)) == len(ids)}, "
      f"errors {s['rows_failed']}, out tok/s {s['output_tokens_per_second']}, ranks {[(r['rank'], r['rows']) for r in s['ranks']]}")
PY
}
case "${1:-}" in
  deps) pip install -q --no-index --no-deps --target /tmp/hdeps .gpudeps/*.whl && echo deps ok ;;
  part) echo "kit ready: ${GPUKIT_READY:-0}" ;;
  last) [ -d .gpuspy ] && pip install -q --no-index --no-deps --target /tmp/spy .gpuspy/*.whl
    echo "kit ready: ${GPUKIT_READY:-0}"; nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader ;;
  moe)
    [ "${GPUKIT_READY:-0}" = 1 ] || { echo "kit not complete"; exit 1; }
    timeout 280 python3 -m hpcinfer.submit model=tiny_moe ep=true dp=2 $common run_dir=$O/moe-ep > $O/moe-ep.log 2>&1; echo "moe-ep exit $?"
    show moe-ep $O/moe-ep; grep -h -i -E "EP rank|expert parallel|DP rank|dp_rank|EP1|DP1" $O/moe-ep/logs/rank-*.log | cut -c1-220 | head -8
    timeout 200 python3 -m hpcinfer.submit model=tiny_moe dp=2 $common run_dir=$O/moe-noep > $O/moe-noep.log 2>&1; echo "moe-noep exit $?"
    show moe-noep $O/moe-noep
    tail -n 5 $O/moe-ep.log $O/moe-noep.log
    ;;
  submit)  # submit NAME [OVERRIDES...]: one hpcinfer run with the common overrides, and its result
    [ "${GPUKIT_READY:-0}" = 1 ] || { echo "kit not complete"; exit 1; }
    name=$2; shift 2
    timeout 400 python3 -m hpcinfer.submit $common "$@" run_dir=$O/$name > $O/$name.log 2>&1; echo "$name exit $?"
    show $name $O/$name; grep -h -E "EP Rank [0-9]+/" $O/$name/logs/rank-*.log | cut -c1-200 | head -4; tail -n 3 $O/$name.log
    ;;
  moe-uneven)  # lockstep with one rank idle: rows 0-255 (rank 0) stop after 4 tokens, 256-511 (rank 1) run 400
    [ "${GPUKIT_READY:-0}" = 1 ] || { echo "kit not complete"; exit 1; }
    python3 -c "
import pyarrow as pa, pyarrow.parquet as pq
n = 512
pq.write_table(pa.table({'id': list(range(n)), 'prompt': [f'Tell me about topic {i}.' for i in range(n)],
                         'max_tokens': [4 if i < n // 2 else 400 for i in range(n)]}), '$O/uneven.parquet')"
    timeout 400 python3 -m hpcinfer.submit model=tiny_moe ep=true dp=2 $common data.input=$O/uneven.parquet \
      data.id_column=id data.max_tokens_column=max_tokens sampling.ignore_eos=true run_dir=$O/moe-uneven \
      > $O/moe-uneven.log 2>&1; echo "moe-uneven exit $?"
    show moe-uneven $O/moe-uneven
    python3 -c "
import json; s = json.load(open('$O/moe-uneven/summary.json'))
for r in s['ranks']: print('rank', r['rank'], 'rows', r['rows'], 'output tokens', r['output_tokens'], 'generation s', r['generation_seconds'])"
    grep -h -E "EP Rank|idle|dummy" $O/moe-uneven/logs/rank-*.log | cut -c1-200 | head -4; tail -n 3 $O/moe-uneven.log
    ;;
  span)  # span [EXTRA OVERRIDES...]: a tp=2 replica over two "nodes" of one GPU (leader + headless)
    shift; [ -d .gpuspy ] && [ ! -x /tmp/spy/bin/py-spy ] && pip install -q --no-index --no-deps --target /tmp/spy .gpuspy/*.whl
    name=${SPAN_NAME:-span}$(printf '%s' "$*" | tr -c 'a-z0-9' '_' | cut -c1-40)
    python3 -m hpcinfer.submit tp=2 cluster.gpus_per_node=1 $common "$@" run_dir=$O/$name > $O/$name.log 2>&1 &
    pid=$!
    for _ in $(seq ${WAIT:-150}); do [ -f $O/$name/summary.json ] || ! kill -0 $pid 2>/dev/null && break; sleep 1; done
    if [ ! -f $O/$name/summary.json ] && kill -0 $pid 2>/dev/null; then
      echo "== $name has not finished after ${WAIT:-150} s: the stacks of its processes"
      procs="^python3 -m hpcinfer|-m hpcinfer\.(worker|headless)|^VLLM::"
      for p in $(pgrep -f "$procs"); do
        echo "--- pid $p: $(tr '\0' ' ' < /proc/$p/cmdline | cut -c1-120)"
        /tmp/spy/bin/py-spy dump --pid $p 2>&1 | grep -E "^ +[A-Za-z_.<>]+ \(|Thread|Process" | head -24
      done
      kill -TERM $pid; sleep 8; pkill -9 -f "$procs"
    fi
    wait $pid; echo "$name exit $?"
    [ -f $O/$name/summary.json ] && show $name $O/$name
    for f in $O/$name/logs/*.log; do echo "--- $f"; grep -v -E "it/s|^\s*$" $f | cut -c1-240 | tail -25; done
    ;;
  balance)
    [ -d /tmp/llama-1b ] || python3 bench/make_llama.py /tmp/llama-1b
    timeout 560 python3 bench/balance.py --dp 2 --rows 4096 --long-tokens 1024 --short-tokens 32 --model llama \
      --set model.name=llama-1b model.path=/tmp/llama-1b engine.max_model_len=2048 engine.gpu_memory_utilization=0.85 \
      --sides ${SIDES:-raw-static,hpcinfer} 2>&1 | grep -v -E "INFO|WARNING|it/s" | tail -25
    ;;
  *) echo "usage: bash bench/gpu_runs.sh deps|part|last|moe|moe-uneven|span|submit|balance"; exit 2 ;;
esac
