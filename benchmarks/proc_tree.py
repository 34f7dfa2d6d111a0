"""Process trees from /proc (Linux), for the benchmarks: their processes, CPU time and peak memory."""

from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def tree_pids(roots: list[int]) -> list[int]:
    """The processes of the trees rooted at `roots` (children through every thread's children list)."""
    found, seen, todo = [], set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        found.append(pid)
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return found


def cpu_seconds(pid: int) -> float:
    """User+system seconds one process has used so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS     # utime, stime: fields 14 and 15 of proc(5)


def tree_cpu_seconds(roots: list[int]) -> float:
    """User+system seconds used so far by the live processes of the trees rooted at `roots`."""
    return sum(cpu_seconds(pid) for pid in tree_pids(roots))


def stub_model(pid: int) -> str | None:
    """The model a Triton Python backend stub serves (from its `.../MODEL/1/model.py` argument), else None."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for part in cmdline:
        if part.endswith(b"/1/model.py"):
            return Path(part.decode()).parent.parent.name
    return None


def role(pid: int, root: int) -> str:
    """'tritonserver' (the root), the model a Python backend stub serves, or 'other'."""
    return "tritonserver" if pid == root else stub_model(pid) or "other"


def stub_pids(roots: list[int], model: str) -> list[int]:
    """The stubs serving `model` in the process trees rooted at `roots`."""
    return [pid for pid in tree_pids(roots) if stub_model(pid) == model]


def tree_cpu_by_role(root: int) -> dict[str, float]:
    """CPU seconds used so far by `root` (tritonserver) and its descendants, by role (tritonserver, each
    model's stubs); "total" sums them."""
    by_role: dict[str, float] = {"total": 0.0}
    for pid in tree_pids([root]):
        seconds = cpu_seconds(pid)
        name = role(pid, root)
        by_role[name] = by_role.get(name, 0.0) + seconds
        by_role["total"] += seconds
    return by_role


def tree_peak_rss(roots: list[int]) -> int:
    """Sum of VmHWM (peak resident set) in bytes over the process trees rooted at `roots`."""
    total = 0
    for pid in tree_pids(roots):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += sum(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
    return total
