"""Slurm host lists: expand `SLURM_JOB_NODELIST` expressions and find a node's address.

`expand_nodelist` is a pure parser of Slurm's hostlist syntax (`gpu[001-003,7],login1`);
`hostnames` and `resolve_address` are the edge functions that prefer Slurm's own answer
(`scontrol`) when it is available and fall back to the parser / DNS.
"""

from __future__ import annotations

import itertools
import re
import shutil
import socket
import subprocess
from typing import List, Optional

# Slurm refuses ranges of more hosts than this (MAX_RANGE in src/common/hostlist.c).
MAX_RANGE = 64 * 1024


_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?")


_BRACKET_GROUP = re.compile(r"\[([^\[\]]*)\]")


def _bad(nodelist: str, why: str) -> ValueError:
    return ValueError(f"cannot parse Slurm node list {nodelist!r}: {why}")


def _split_top_level(nodelist: str) -> List[str]:
    """Split at commas outside brackets; reject unbalanced or nested brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            if depth:
                raise _bad(nodelist, f"nested '[' at position {i}")
            depth = 1
        elif ch == "]":
            if not depth:
                raise _bad(nodelist, f"']' without '[' at position {i}")
            depth = 0
        elif ch == "," and not depth:
            items.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise _bad(nodelist, "'[' is never closed")
    items.append(nodelist[start:])
    return items


def _expand_ranges(nodelist: str, group: str) -> List[str]:
    """`001-003,7` -> ['001', '002', '003', '7']: zero padding to the width of the lower bound."""
    if not group:
        raise _bad(nodelist, "empty brackets '[]'")
    out: List[str] = []
    for part in group.split(","):
        m = _RANGE.fullmatch(part)
        if not m:
            raise _bad(nodelist, f"{part!r} in [{group}] is not a number or a range lo-hi of numbers")
        lo_text, hi_text = m.group(1), m.group(2)
        lo, hi = int(lo_text), int(hi_text if hi_text is not None else lo_text)
        if lo > hi:
            raise _bad(nodelist, f"range {part!r} is reversed ({lo} > {hi})")
        if hi - lo + 1 > MAX_RANGE:
            raise _bad(nodelist, f"range {part!r} has more than {MAX_RANGE} hosts")
        width = len(lo_text)
        out.extend(f"{n:0{width}d}" for n in range(lo, hi + 1))
    return out


def _expand_item(nodelist: str, item: str) -> List[str]:
    """One top-level item: `r[1-2]n[01-02]` -> r1n01, r1n02, r2n01, r2n02 (the cartesian product).

    Slurm's order (src/common/hostlist.c, checked against scontrol 22.05): the last bracket varies
    fastest, then the first, then the second, ..., the second-to-last slowest. With two brackets that
    is "first slowest"; `a[1-2]b[1-2]c[1-2]` gives a1b1c1, a1b1c2, a2b1c1, a2b1c2, a1b2c1, ...
    """
    if not item:
        raise _bad(nodelist, "empty item (two commas in a row, or a leading/trailing comma)")
    pieces = _BRACKET_GROUP.split(item)  # text, group, text, group, ..., text
    texts, groups = pieces[0::2], [_expand_ranges(nodelist, g) for g in pieces[1::2]]
    k = len(groups)
    order = list(range(k - 2, -1, -1)) + [k - 1] if k else []  # slowest first
    hosts = []
    for combo in itertools.product(*(groups[i] for i in order)):
        value = dict(zip(order, combo, strict=True))
        hosts.append(texts[0] + "".join(value[i] + texts[i + 1] for i in range(k)))
    return hosts


def expand_nodelist(nodelist: str) -> List[str]:
    """The host names of a Slurm hostlist expression, in Slurm's order, duplicates kept.

    `gpu[001-003,7],login1` -> gpu001, gpu002, gpu003, gpu7, login1. Raises ValueError naming
    the input for anything it does not understand (empty input, whitespace, unbalanced or nested
    brackets, empty brackets or items, reversed or non-numeric ranges).
    """
    if not isinstance(nodelist, str) or not nodelist:
        raise ValueError(f"cannot parse Slurm node list {nodelist!r}: it is empty")
    if any(ch.isspace() for ch in nodelist):
        raise _bad(nodelist, "it contains whitespace")
    hosts: List[str] = []
    for item in _split_top_level(nodelist):
        hosts.extend(_expand_item(nodelist, item))
    return hosts


def _scontrol(*args: str, timeout: float = 30) -> Optional[str]:
    """stdout of `scontrol args...`, or None when scontrol is missing or fails."""
    exe = shutil.which("scontrol")
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def hostnames(nodelist: str) -> List[str]:
    """The hosts of `nodelist`: Slurm's own expansion (`scontrol show hostnames`) when it works,
    else `expand_nodelist`."""
    out = _scontrol("show", "hostnames", nodelist, timeout=10)
    hosts = out.split() if out else []
    return hosts or expand_nodelist(nodelist)


def resolve_address(host: str) -> str:
    """The IP address of `host`: DNS first, else the node's NodeAddr in Slurm. ValueError if neither."""
    try:
        return socket.gethostbyname(host)
    except OSError as e:
        dns_error = e
    m = re.search(r"\bNodeAddr=(\S+)", _scontrol("show", "node", host) or "")
    if m:
        try:
            return socket.gethostbyname(m.group(1))  # an IP literal comes back unchanged
        except OSError:
            pass
    raise ValueError(
        f"cannot resolve host {host!r}: DNS says {dns_error}; "
        + (f"its Slurm NodeAddr {m.group(1)!r} does not resolve either" if m else "scontrol gives no NodeAddr for it")
    )
