#!/usr/bin/env bash
# The GPU runs behind docs/benchmarks.md, on a lent 2-GPU machine (no network) with the vLLM kit of
# shared/tools/gpu-vllm (MOE=1, 3 parts) carried in .gpukit0..3 and hpcinfer's pure-Python wheels
# in .gpudeps (hydra-core, omegaconf, antlr4, submitit, cloudpickle). One step per command, each
# within 30 s of the previous one (the machine keeps /tmp while it stays up):
#   bash bench/gpu_runs.sh deps      # carry .gpukit0 .gpukit1 .gpudeps
#   bash bench/gpu_runs.sh part      # carry .gpukit0 .gpukit2
#   bash bench/gpu_runs.sh moe       # carry .gpukit0 .gpukit3: MoE EP lockstep, MoE without EP, spanning tp=2
#   bash bench/gpu_runs.sh balance   # the skewed-workload benchmark at dp=2 (1B random Llama)
set -u
source .gpukit0/device_kit.sh
export PYTHONPATH=/tmp/hdeps:$PWD:${PYTHONPATH:-} HPCINFER_CACHE=/tmp/hc
O=${OUT:-/tmp/out}; mkdir -p "$O"
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
  moe)
    [ "${GPUKIT_READY:-0}" = 1 ] || { echo "kit not complete"; exit 1; }
    nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
    common="data.demo_rows=512 sampling=greedy sampling.max_tokens=64 engine.gpu_memory_utilization=0.4 engine.max_model_len=512"
    timeout 280 python3 -m hpcinfer.submit model=tiny_moe ep=true dp=2 $common run_dir=$O/moe-ep > $O/moe-ep.log 2>&1; echo "moe-ep exit $?"
    show moe-ep $O/moe-ep; grep -h -i -E "EP rank|expert parallel|DP rank|dp_rank|EP1|DP1" $O/moe-ep/logs/rank-*.log | cut -c1-220 | head -8
    timeout 200 python3 -m hpcinfer.submit model=tiny_moe dp=2 $common run_dir=$O/moe-noep > $O/moe-noep.log 2>&1; echo "moe-noep exit $?"
    show moe-noep $O/moe-noep
    timeout 200 python3 -m hpcinfer.submit tp=2 cluster.gpus_per_node=1 $common run_dir=$O/span > $O/span.log 2>&1; echo "span exit $?"
    show span $O/span; ls $O/span/logs; grep -h -i -E "nnodes|node_rank|headless" $O/span/logs/*.log | cut -c1-220 | head -6
    tail -5 $O/moe-ep.log $O/moe-noep.log $O/span.log
    ;;
  balance)
    [ -d /tmp/llama-1b ] || python3 bench/make_llama.py /tmp/llama-1b
    timeout 560 python3 bench/balance.py --dp 2 --rows 4096 --long-tokens 1024 --short-tokens 32 --model llama \
      --set model.name=llama-1b model.path=/tmp/llama-1b engine.max_model_len=2048 engine.gpu_memory_utilization=0.85 \
      2>&1 | grep -v -E "INFO|WARNING|it/s" | tail -25
    ;;
  *) echo "usage: bash bench/gpu_runs.sh deps|part|moe|balance"; exit 2 ;;
esac
