"""CPU seconds of each process of a running `stageserve up`, by role, from /proc (Linux only).

The benchmarks read these before and after a load run: a process whose CPU time grows by
about the run's wall time holds a core the whole run, and if it is the router (one Python
process with the scheduler and every stream) it is what bounds tokens/s.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def deployment_processes(root: int) -> dict[str, int]:
    """The router, stage and rank processes under `stageserve up` (pid `root`), by role:
    router, stage{i}, stage{i}-rank{r}."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    rows = [(int(pid), int(ppid), args) for pid, ppid, args in (line.split(None, 2) for line in out)]
    roles: dict[str, int] = {}
    for pid, ppid, args in rows:
        if ppid == root and " router " in f" {args} ":
            roles["router"] = pid
        elif ppid == root and " stage " in f" {args} ":
            index = args.split("--stage-index", 1)[1].split()[0]
            roles[f"stage{index}"] = pid
            for child, parent, child_args in rows:
                if parent == pid and "spawn_main" in child_args:  # not the resource tracker
                    roles[f"stage{index}-rank{len([r for r in roles if r.startswith(f'stage{index}-')])}"] = child
    return roles


def cpu_snapshot(roles: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each role now; a process that is gone counts as absent."""
    out = {}
    for role, pid in roles.items():
        try:
            out[role] = cpu_seconds(pid)
        except OSError:
            pass
    return out
