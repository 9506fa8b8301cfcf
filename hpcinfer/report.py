"""`python -m hpcinfer.report <sweep_dir>`: compare the runs of a layout sweep.

A sweep (`python -m hpcinfer.submit -m tp=1,2 dp=1,2 ...`) puts each run in `<sweep_dir>/<n>/`.
The report reads every run's plan.json and summary.json (or, for a run still queued or running,
its state), writes `<sweep_dir>/report.md` (a table) and `<sweep_dir>/report.png` (output
tokens/s per GPU by layout), prints the table and names the best finished layout.
Exit codes: 0 written, 1 no finished run yet, 2 not a sweep directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from hpcinfer.errors import EXIT_FAILED, EXIT_OK, UserError, exit_on_user_error
from hpcinfer.rundir.files import atomic_path, atomic_write
from hpcinfer.rundir.paths import RunDir


def row_of(rd: RunDir) -> Dict[str, Any]:
    """One run of the sweep as a table row (pure given the run directory's files)."""
    plan = rd.read_plan()
    summary = rd.read_optional(rd.summary)
    devices = plan.dp * plan.tp * plan.pp
    tps = (summary or {}).get("output_tokens_per_second")
    return {
        "run": rd.path.name,
        "layout": f"tp={plan.tp} pp={plan.pp} dp={plan.dp}",
        "device_kind": plan.device_kind,
        "devices": devices,
        "state": "finished" if summary else "unfinished",
        "rows": plan.rows,
        "output_tokens_per_second": tps,
        "per_device": tps / devices if tps else None,
        "wall_seconds": (summary or {}).get("wall_seconds"),
    }


def best(rows: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The finished layout with the most output tokens/s per GPU (or CPU worker)."""
    done = [r for r in rows if r["per_device"]]
    return max(done, key=lambda r: r["per_device"]) if done else None


def fmt(value: Optional[float], spec: str) -> str:
    """`value` formatted by `spec`, or "-" when there is none."""
    return format(value, spec) if value is not None else "-"


def table(rows: List[Dict[str, Any]]) -> str:
    """A Markdown table. Pure."""
    unit = "GPU" if any(r["device_kind"] == "cuda" for r in rows) else "CPU worker"
    lines = [
        f"| run | layout | {unit}s | state | output tok/s | tok/s per {unit} | wall s |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['layout']} | {r['devices']} | {r['state']} | "
            f"{fmt(r['output_tokens_per_second'], ',.0f')} | {fmt(r['per_device'], ',.0f')} | "
            f"{fmt(r['wall_seconds'], '.1f')} |"
        )
    return "\n".join(lines)


def plot(rows: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["per_device"]]
    top = best(rows)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(done) + 2), 3.5))
    bars = ax.bar(
        [r["layout"].replace(" ", "\n") for r in done],
        [r["per_device"] for r in done],
        color=["tab:green" if r is top else "tab:blue" for r in done],
    )
    ax.bar_label(bars, fmt="{:,.0f}")
    unit = "GPU" if any(r["device_kind"] == "cuda" for r in done) else "CPU worker"
    ax.set_ylabel(f"output tokens/s per {unit}")
    ax.set_title(f"{path.parent.name}: throughput by layout")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def report(sweep_dir: str) -> Dict[str, Any]:
    root = Path(sweep_dir)
    runs = (
        sorted(
            (RunDir(p) for p in root.iterdir() if (p / "plan.json").exists()),
            key=lambda rd: (len(rd.path.name), rd.path.name),
        )
        if root.is_dir()
        else []
    )
    if not runs:
        raise UserError(f"{sweep_dir!r} holds no hpcinfer runs (expected <sweep_dir>/<n>/plan.json)")
    rows = [row_of(rd) for rd in runs]
    top = best(rows)
    text = table(rows)
    verdict = (
        f"best layout: {top['layout']} ({top['per_device']:,.0f} output tok/s per "
        f"{'GPU' if top['device_kind'] == 'cuda' else 'CPU worker'}, run {top['run']})"
        if top
        else "no finished run yet"
    )
    atomic_write(root / "report.md", f"# Sweep {root}\n\n{text}\n\n{verdict}\n")
    if top:
        plot(rows, root / "report.png")
    return {"rows": rows, "best": top, "table": text, "verdict": verdict}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpcinfer.report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        out = report(args.sweep_dir)
    print(out["table"])
    print(out["verdict"])
    if out["best"]:
        print(f"wrote {Path(args.sweep_dir) / 'report.md'} and {Path(args.sweep_dir) / 'report.png'}")
    return EXIT_OK if out["best"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
