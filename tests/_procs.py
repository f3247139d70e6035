"""Subprocess helpers for the multi-process tests (DeepSpeed, Ulysses, training, dschat).

Waiting: a group of processes is given as long as it makes progress. It is ended only when,
for ``stall_s`` seconds, none of its processes has printed anything or used CPU time (a
deadlock: gloo peers waiting on each other sleep), or after ``cap_s`` in all. On a quiet
2-core machine these tests take 0.5-3 minutes; on one shared with other CPU-heavy work
they take several times longer but keep progressing, so no fixed short deadline fails
them. ``cap_s`` (default 45 min) only stops a runaway that spins without end; it is far
above any loaded-machine time seen and well inside CI's 90 minutes.

DeepSpeed's one-time CPU op build: on its CPU accelerator, ``deepspeed.init_distributed``
JIT-builds the shared-memory communication op (``deepspeed_shm_comm``) on the first run on a
machine (seconds to minutes; cached in torch's extension directory afterwards).
:func:`prebuild_deepspeed_cpu_ops` does that build outside any timed section.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STALL_S = 600.0
CAP_S = 45 * 60.0

_prebuilt = False


def prebuild_deepspeed_cpu_ops() -> None:
    """Build (or find built) DeepSpeed's CPU communication op once per test session, untimed."""
    global _prebuilt
    if _prebuilt:
        return
    code = ("import os; os.environ.setdefault('DS_ACCELERATOR', 'cpu')\n"
            "from deepspeed.accelerator import get_accelerator\n"
            "b = get_accelerator().create_op_builder('ShareMemCommBuilder')\n"
            "import deepspeed\n"
            "ok = b is not None and deepspeed.ops.__compatible_ops__.get(b.NAME, False)\n"
            "print('built' if ok and b.load() is not None else 'not used here')\n")
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    env.pop("TRITON_INTERPRET", None)
    subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # no timeout: the one-time build, whatever the machine's load
    _prebuilt = True


def _cpu_seconds(proc: psutil.Process) -> float:
    total = 0.0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


class Group:
    """Processes started together, each with its output in a file."""

    def __init__(self, cmds: Sequence[Sequence[str]], envs: Sequence[Dict[str, str]], cwd: str = ROOT,
                 merge_stderr: bool = True):
        """``merge_stderr=False``: :meth:`output` is stdout alone (stderr in :meth:`report`)."""
        self.dir = tempfile.mkdtemp(prefix="sft_procs_")
        self.logs = [os.path.join(self.dir, f"proc{i}.log") for i in range(len(cmds))]
        self.errs = [os.path.join(self.dir, f"proc{i}.err") for i in range(len(cmds))] if not merge_stderr else []
        self.procs = []
        for i, (cmd, env, log) in enumerate(zip(cmds, envs, self.logs)):
            with open(log, "w") as f:
                err = open(self.errs[i], "w") if self.errs else None
                self.procs.append(subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=f,
                                                   stderr=err if err else subprocess.STDOUT, text=True))
                if err:
                    err.close()

    def output(self, i: int) -> str:
        with open(self.logs[i], errors="replace") as f:
            return f.read()

    def errors(self, i: int) -> str:
        if not self.errs:
            return ""
        with open(self.errs[i], errors="replace") as f:
            return f.read()

    def wait(self, stall_s: float = STALL_S, cap_s: float = CAP_S, poll_s: float = 2.0) -> List[int]:
        """Return codes, once every process has exited; kill all on a stall or past the cap."""
        handles = [psutil.Process(p.pid) for p in self.procs]
        start = last_progress = time.monotonic()
        seen = None
        why = None
        while any(p.poll() is None for p in self.procs):
            time.sleep(poll_s)
            now = time.monotonic()
            marks = (tuple(os.path.getsize(log) for log in self.logs + self.errs),
                     round(sum(_cpu_seconds(h) for h, p in zip(handles, self.procs) if p.poll() is None), 1))
            if marks != seen:
                seen, last_progress = marks, now
            if now - last_progress > stall_s:
                why = f"no output and no CPU time from any process for {stall_s:.0f} s (deadlock?)"
            elif now - start > cap_s:
                why = f"still running after {cap_s:.0f} s"
            if why:
                for p in self.procs:
                    if p.poll() is None:
                        p.kill()
                for p in self.procs:
                    p.wait()
                break
        self.why = why
        return [p.returncode for p in self.procs]

    def report(self, tail: int = 4000) -> str:
        parts = [f"(ended: {self.why})"] if getattr(self, "why", None) else []
        for i in range(len(self.procs)):
            parts.append(f"--- process {i} (rc {self.procs[i].returncode}) ---\n{self.output(i)[-tail:]}"
                         + (f"\n--- its stderr ---\n{self.errors(i)[-tail:]}" if self.errs else ""))
        return "\n".join(parts)


def rank_envs(world: int, port: int, extra: Optional[Dict[str, str]] = None, pythonpath: bool = True):
    """The environment the deepspeed launcher gives each rank, on CPU (gloo)."""
    envs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **(extra or {}))
        if pythonpath:
            env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.pop("TRITON_INTERPRET", None)
        envs.append(env)
    return envs


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
