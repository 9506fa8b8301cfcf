#!/usr/bin/env bash
# bench/overhead.py on a lent one-GPU H200 machine (no network), with the vLLM kit of
# shared/tools/gpu-vllm (3 parts) carried in .gpukit0..3, hpcinfer's pure-Python dependencies as
# wheels in .gpudeps (hydra-core, omegaconf, antlr4, submitit, cloudpickle) and py-spy's in .gpuspy.
# Run from the repo root of the device's copy; this checkout (hpcinfer/, conf/, bench/) may be a
# carried folder (`bash .wt18/bench/gpu_overhead.sh ...`). One step per command, each within 30 s
# of the previous reply (the machine keeps /tmp only while it stays up):
#   bash bench/gpu_overhead.sh prep [8b]  # carry .gpukit0 .gpukit1 .gpudeps .gpuspy: deps, py-spy,
#                                         # the 0.83B random Llama (and the 8B-shaped one) in /tmp
#   bash bench/gpu_overhead.sh run NAME MODEL_DIR [overhead.py options]   # carry .gpukit0 .gpukit2 .gpukit3
#        (one pair per call: --first-pair N, N the pairs of earlier calls, keeps alternating which side goes first)
#        e.g. run llama1b /tmp/llama-1b --rows 4096 --max-tokens 256 --repeats 5 --budget-s 540 --profile
#        (a further --set adds overrides to the script's, e.g. --set engine.max_num_seqs=512;
#        --budget-s: stop before a pair that would not end within the call's 600 s; a next call on
#        the same machine goes on with --warmup-rows 0)
#   bash bench/gpu_overhead.sh prefix NAME MODEL_DIR [prefix.py options]   # the same carry; issue 16
#        (more config overrides: PREFIX_SET, or a further --set, as for run)
#   bash bench/gpu_overhead.sh startgap NAME MODEL_DIR [start_gap.py options]   # the same carry; start-only
#        runs of raw vLLM, a rank-like process and hpcinfer, interleaved: where the rank's start goes
#   bash bench/gpu_overhead.sh forkcheck   # the same carry: after vLLM's import, does a fork with
#        CUDA_VISIBLE_DEVICES="" see no GPU and one with "0" see GPU 0 (GPU ranks as forks: forkserver.py)
#   bash bench/gpu_overhead.sh importtime [N]   # the same carry (or .gpukit0 alone on a machine that
#        has the kit): `from vllm import LLM` in a fresh process, N times (default 3) each with raw's
#        environment and with a rank's additions (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE), interleaved
set -u
source .gpukit0/device_kit.sh
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=/tmp/hdeps:$ROOT:${PYTHONPATH:-} HPCINFER_CACHE=/tmp/hc
# one vLLM cache (torch.compile artifacts) for every side and every call while the machine stays
# up: a later call may then skip the warm-up runs (--warmup-rows 0) without compiling in a timed run
export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-/tmp/vllm-cache}
O=${OUT:-/tmp/out}; mkdir -p "$O"
# after a benchmark wrote $O/NAME.log (and its runs' logs in $O/NAME/): its exit, its lines without
# vLLM's, and the runs' logs as one file (a call brings back 8 files at most)
finish() {
  echo "exit $2"; grep -v -E "INFO|WARNING|it/s|^\s*$|Warning|warn\(" "$O/$1.log" | tail -40
  if [ -d "$O/$1" ]; then tar czf "$O/$1-logs.tgz" -C "$O" "$1" && rm -rf "${O:?}/$1"; fi
}
case "${1:-}" in
  prep)
    pip install -q --no-index --no-deps --target /tmp/hdeps .gpudeps/*.whl && echo deps ok
    pip install -q --no-index --no-deps --target /tmp/spy .gpuspy/*.whl && echo py-spy ok
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    [ -d /tmp/llama-1b ] || (cd "$ROOT" && python3 bench/make_llama.py /tmp/llama-1b 2>&1 | tail -1)
    [ "${2:-}" = 8b ] && { [ -d /tmp/llama-8b ] || (cd "$ROOT" && time python3 bench/make_llama.py /tmp/llama-8b 8b 2>&1 | tail -1); }
    df -h /tmp | tail -1
    ;;
  run)
    [ "${GPUKIT_READY:-0}" = 1 ] || { echo "kit not complete"; exit 1; }
    name=$2 model=$3; shift 3
    prof=(); [ "${1:-}" = --profile ] && { prof=(--profile "$O/$name-pyspy.txt" --py-spy /tmp/spy/bin/py-spy); shift; }
    cd "$ROOT" && python3 bench/overhead.py --model llama --json "$O/$name.json" "${prof[@]}" \
      --set model.name=$name model.path=$model engine.max_model_len=1024 engine.gpu_memory_utilization=0.85 "$@" \
      > "$O/$name.log" 2>&1
    finish "$name" $?
    # py-spy's raw stacks run to ~40 MB for a 2-minute run, past what a device call brings back
    if [ -f "$O/$name-pyspy.txt" ]; then gzip -9 "$O/$name-pyspy.txt" && ls -la "$O/$name-pyspy.txt.gz"; fi
    ;;
  prefix)  # prefix NAME MODEL_DIR [prefix.py options]: bench/prefix.py on the GPU
    [ "${GPUKIT_READY:-0}" = 1 ] || { echo "kit not complete"; exit 1; }
    name=$2 model=$3; shift 3
    cd "$ROOT" && python3 bench/prefix.py --model llama "$@" --set model.name=$name model.path=$model \
      engine.gpu_memory_utilization=0.85 ${PREFIX_SET:-} > "$O/$name.log" 2>&1
    finish "$name" $?
    ;;
  startgap)  # startgap NAME MODEL_DIR [start_gap.py options]: where the rank's start goes (issue 18)
    [ "${GPUKIT_READY:-0}" = 1 ] || { echo "kit not complete"; exit 1; }
    name=$2 model=$3; shift 3
    cd "$ROOT" && python3 bench/start_gap.py --model llama --json "$O/$name.json" \
      --set model.name=$name model.path=$model engine.max_model_len=1024 engine.gpu_memory_utilization=0.85 "$@" \
      > "$O/$name.log" 2>&1
    finish "$name" $?
    ;;
  forkcheck)  # whether a fork made after vLLM's import (as forkserver.py's) still chooses its GPUs
    [ "${GPUKIT_READY:-0}" = 1 ] || { echo "kit not complete"; exit 1; }
    python3 - <<'PY' 2>&1 | grep -E "^(parent|child)"
import json, os
import vllm.entrypoints.llm  # noqa: F401  what the fork server imports
import torch
from hpcinfer.launch.forkserver import driver_initialized, driver_path
maps = open("/proc/self/maps").read()
print("parent: libcuda", driver_path(maps), "initialized", driver_initialized(maps), "torch", torch.cuda.is_initialized())
for visible in ("", "0"):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
        try:
            out = {"driver_count": torch._C._cuda_getDeviceCount(), "count": torch.cuda.device_count()}
            out["sum"] = float(torch.ones(2, device="cuda").sum())
        except Exception as e:
            out = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
        os.write(w, json.dumps({"CUDA_VISIBLE_DEVICES": visible, **out}).encode())
        os._exit(0)
    os.close(w)
    print("child:", os.read(r, 4096).decode())
    os.waitpid(pid, 0)
PY
    ;;
  importtime)
    [ "${GPUKIT_READY:-0}" = 1 ] || { echo "kit not complete"; exit 1; }
    imp='import time; t = time.monotonic(); from vllm import LLM; print(f"{time.monotonic() - t:.2f}")'
    for i in $(seq "${2:-3}"); do
      echo "$i raw  $(CUDA_VISIBLE_DEVICES=0 python3 -c "$imp" 2>/dev/null | tail -1) s"
      echo "$i rank $(CUDA_VISIBLE_DEVICES=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python3 -c "$imp" 2>/dev/null | tail -1) s"
    done
    ;;
  *) echo "usage: bash bench/gpu_overhead.sh prep [8b] | run|prefix|startgap NAME MODEL_DIR [overhead.py|prefix.py|start_gap.py options] | forkcheck | importtime [N]"; exit 2 ;;
esac
