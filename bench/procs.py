"""Child processes for the benchmark, and a monitor of their memory and CPU.

Every child runs in its own session (process group), writes its output to a log file in the
run's temporary directory, and is killed by `Registry.kill_all()` (SIGTERM to the group, then
SIGKILL), which `run.py` calls from a `finally` block, so Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


class StartError(RuntimeError):
    """A helper process could not be started or did not become ready."""


class Proc:
    def __init__(self, registry: "Registry", args: list[str], name: str, *, env: dict | None = None,
                 cwd: str | Path | None = None) -> None:
        self.name = name
        self.args = args
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        registry.started += 1
        self.log_path = registry.logdir / f"{registry.started:03d}-{safe}.log"
        full_env = dict(os.environ)
        full_env.update(env or {})
        self._log = open(self.log_path, "wb")
        try:
            self.popen = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                env=full_env, cwd=cwd, start_new_session=True,
            )
        except OSError as exc:
            self._log.close()
            raise StartError(f"cannot start {name}: {exc}") from exc
        registry.procs.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")
        except OSError:
            return ""

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.output().splitlines()[-n:])

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """Wait until the process prints a line matching `pattern`; the match is returned."""
        regex = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output())
            if match:
                return match
            if not self.alive():
                match = regex.search(self.output())
                if match:
                    return match
                raise StartError(f"{self.name} exited with status {self.popen.returncode} before printing "
                                 f"{pattern!r}; its output:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise StartError(f"{self.name} did not print {pattern!r} within {timeout:.0f} s; "
                                 f"its output:\n{self.tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.popen.wait(3)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left in the group (the leader may be gone while children linger) gets SIGKILL.
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


class Registry:
    """All processes started by the benchmark, so they can all be killed at the end."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[Proc] = []
        self.started = 0

    def start(self, args: list[str], name: str, **kwargs) -> Proc:
        return Proc(self, args, name, **kwargs)

    def kill(self, procs: list[Proc]) -> None:
        for proc in reversed(procs):
            proc.kill()
            if proc in self.procs:
                self.procs.remove(proc)

    def kill_all(self) -> None:
        self.kill(list(self.procs))


# ---------------------------------------------------------------------------------------------
# /proc readers


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as fh:
                    out.extend(int(x) for x in fh.read().split())
            except OSError:
                pass
    except OSError:
        pass
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants that are alive now."""
    seen = [pid]
    i = 0
    while i < len(seen):
        seen.extend(c for c in _children(seen[i]) if c not in seen)
        i += 1
    return seen


def read_status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


HAVE_SCHEDSTAT = os.path.exists("/proc/self/schedstat")


def read_cpu(pid: int) -> tuple[int, int] | None:
    """CPU time one process has run, in nanoseconds, and how many times its threads were put on a CPU (each
    wake-up after waiting for I/O is one, and so is each return after a preemption): the sums over its threads of
    /proc/PID/task/*/schedstat's first and third fields. Its nanoseconds are exact where utime + stime counts 10 ms
    ticks (a 20 MB transfer through a tunnel costs a few ticks, too coarse to divide by its megabytes). On a kernel
    without schedstat, the ticks of /proc/PID/stat and no count of runs (0)."""
    if not HAVE_SCHEDSTAT:
        cpu_ns = _read_stat_cpu_ns(pid)
        return None if cpu_ns is None else (cpu_ns, 0)
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    cpu_ns = runs = 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                fields = fh.read().split()
            cpu_ns += int(fields[0])
            runs += int(fields[2])
        except (OSError, ValueError, IndexError):
            pass  # a thread that ended since the listing: its time went with it
    return cpu_ns, runs


def read_syscalls(pid: int) -> int:
    """System calls one process made that read or write (/proc/PID/io syscr + syscw, all its threads); 0 where
    the kernel has no I/O accounting."""
    total = 0
    try:
        with open(f"/proc/{pid}/io") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("syscr", "syscw"):
                    total += int(value)
    except (OSError, ValueError):
        return 0
    return total


def _read_stat_cpu_ns(pid: int) -> int | None:
    """utime + stime of one process (clock ticks), in nanoseconds."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data[data.rfind(")") + 2:].split()
    try:
        return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // CLK_TCK  # fields 14 and 15 of stat(5)
    except (IndexError, ValueError):
        return None


def read_machine_ticks() -> list[int]:
    """The first line of /proc/stat: CPU ticks of all cores by kind (user nice system idle iowait irq
    softirq steal ...)."""
    with open("/proc/stat") as fh:
        return [int(x) for x in fh.readline().split()[1:]]


def machine_cpu_share(before: list[int], after: list[int]) -> dict:
    """How the whole machine's CPU time went between two `read_machine_ticks()`, in percent: whether a
    case kept every core busy or left some idle (waiting on wake-ups rather than on the CPU)."""
    delta = [b - a for a, b in zip(before, after)]
    total = sum(delta[:8]) or 1
    idle = delta[3] + delta[4]

    def pct(ticks: int) -> float:
        return round(100 * ticks / total, 1)

    return {"idle_pct": pct(idle), "softirq_pct": pct(delta[6]), "steal_pct": pct(delta[7]),
            "busy_pct": pct(total - idle)}


def reset_hwm(pid: int) -> bool:
    """Reset a process's VmHWM (peak RSS) to its current RSS (Linux >= 4.0, same user or root)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# the monitor


@dataclass
class RoleStats:
    """What the monitor knows about one role (relay, agent, lt, sshd...) in one phase."""

    peak_rss_kib: int = 0
    cpu_ns: int = 0
    syscalls: int = 0  # read-like + write-like system calls (/proc/PID/io syscr + syscw)
    runs: int = 0  # times a thread was put on a CPU (schedstat's third field): wake-ups and preemptions


@dataclass
class Role:
    name: str
    root_pid: int
    # Last counters seen per pid in the tree, as (CPU ns, syscalls, runs) (a pid that exits keeps its last values).
    last_counts: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    hwm_reset_ok: bool = False
    phases: dict[str, RoleStats] = field(default_factory=dict)
    counts_at_phase_start: tuple[int, int, int] = (0, 0, 0)

    def total_counts(self) -> tuple[int, int, int]:
        cpu_ns = syscalls = runs = 0
        for pid_cpu_ns, pid_syscalls, pid_runs in self.last_counts.values():
            cpu_ns += pid_cpu_ns
            syscalls += pid_syscalls
            runs += pid_runs
        return cpu_ns, syscalls, runs


class Monitor:
    """Samples RSS (sum over each role's process tree) and CPU time of the watched roles.

    Peak RSS per phase is the larger of the sampled maximum and, for a single-process role, the
    kernel's exact VmHWM (reset at every phase start through /proc/PID/clear_refs).

    Every role is read at each phase's start and end; between them only the roles of the path under load
    ("PATH:role" in phase "PATH/case") and the shared origin are sampled. The others sit idle, and reading the
    trees of a dozen idle processes 20 times a second took CPU from the loads on a 2-core machine.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.roles: dict[str, Role] = {}
        self.phase = "setup"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="monitor", daemon=True)
        self._thread.start()

    def watch(self, name: str, pid: int) -> None:
        with self._lock:
            role = Role(name, pid)
            role.hwm_reset_ok = reset_hwm(pid)
            role.phases[self.phase] = RoleStats()
            self.roles[name] = role
            self._sample_role(role)

    def unwatch_all(self) -> dict[str, Role]:
        with self._lock:
            self._close_phase()
            roles, self.roles = self.roles, {}
            return roles

    def set_phase(self, phase: str) -> None:
        with self._lock:
            self._close_phase()
            self.phase = phase
            for role in self.roles.values():
                role.phases[phase] = RoleStats()
                role.counts_at_phase_start = role.total_counts()
                role.hwm_reset_ok = reset_hwm(role.root_pid)
                self._sample_role(role)

    def _close_phase(self) -> None:
        for role in self.roles.values():
            self._sample_role(role)
            stats = role.phases.setdefault(self.phase, RoleStats())
            tree = process_tree(role.root_pid)
            if role.hwm_reset_ok and len(tree) == 1:
                hwm = read_status_kib(role.root_pid, "VmHWM")
                if hwm:
                    stats.peak_rss_kib = max(stats.peak_rss_kib, hwm)
            (cpu_ns, syscalls, runs), start = role.total_counts(), role.counts_at_phase_start
            stats.cpu_ns, stats.syscalls, stats.runs = cpu_ns - start[0], syscalls - start[1], runs - start[2]

    def _sample_role(self, role: Role) -> None:
        rss = 0
        for pid in process_tree(role.root_pid):
            kib = read_status_kib(pid, "VmRSS")
            if kib:
                rss += kib
            cpu = read_cpu(pid)
            if cpu is not None:
                role.last_counts[pid] = (cpu[0], read_syscalls(pid), cpu[1])
        stats = role.phases.setdefault(self.phase, RoleStats())
        stats.peak_rss_kib = max(stats.peak_rss_kib, rss)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                for role in self.roles_under_load():
                    self._sample_role(role)

    def roles_under_load(self) -> list[Role]:
        """The roles of the path the current phase loads, and the ones every path shares (the origin)."""
        prefix = self.phase.split("/", 1)[0] + ":"
        return [role for name, role in self.roles.items() if name.startswith(prefix) or ":" not in name]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def summarize(role: Role, phase_prefix: str) -> dict:
    """JSON-ready numbers for one role over one path's phases (named "PATH/CASE"; `phase_prefix` is
    "PATH/"): per phase, overall, and the streams phase vs the rest. Every path's processes are up for the
    whole run, so a role idles through the other paths' phases; the shared origin counts per path."""
    own = {name[len(phase_prefix):]: st for name, st in role.phases.items() if name.startswith(phase_prefix)}
    phases = {
        name: {"peak_rss_mib": round(st.peak_rss_kib / 1024, 1), "cpu_s": round(st.cpu_ns / 1e9, 4),
               "syscalls": st.syscalls, "runs": st.runs}
        for name, st in own.items()
    }
    # with --repeat, a case's later runs are phases "CASE#2", "CASE#3", ...
    streams = [st.peak_rss_kib for name, st in own.items() if name.split("#")[0] == "streams"]
    rest = [st.peak_rss_kib for name, st in own.items() if name.split("#")[0] != "streams"]
    return {
        "peak_rss_mib": round(max((st.peak_rss_kib for st in own.values()), default=0) / 1024, 1),
        "peak_rss_mib_rest": round(max(rest, default=0) / 1024, 1),
        "peak_rss_mib_streams": round(max(streams) / 1024, 1) if streams else None,
        "cpu_s": round(sum(st.cpu_ns for st in own.values()) / 1e9, 2),
        "phases": phases,
    }
