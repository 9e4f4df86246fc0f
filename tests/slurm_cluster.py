"""A throw-away single-node SLURM cluster on localhost (munged, slurmctld, slurmd), for tests and benchmarks.

Everything lives under one folder (key, sockets, state, spool, logs, slurm.conf); the daemons run in the
foreground as children of this process on free ports, and :meth:`LocalSlurm.stop` stops exactly those
processes, by pid. Clients find the cluster through ``SLURM_CONF`` (:attr:`LocalSlurm.env`).
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}
CLIENTS = ("sbatch", "srun", "squeue", "sinfo")


def missing_binaries() -> list[str]:
    """SLURM/munge programs that are not installed (empty when the cluster can start)."""
    missing = [name for name, path in DAEMONS.items() if not (shutil.which(name) or Path(path).is_file())]
    return missing + [name for name in CLIENTS if not shutil.which(name)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or DAEMONS[name]


class LocalSlurm:
    """One node (this machine's CPUs), one partition ``debug``; ``start()`` returns when ``srun hostname`` answers."""

    def __init__(self, root: Path, cpus: int | None = None):
        self.root = Path(root)
        self.cpus = cpus or len(os.sched_getaffinity(0))
        self.node = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.jobcomp = self.root / "log" / "jobcomp.txt"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables a client (sbatch, nipype's SLURM plugin) needs."""
        return {"SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        for sub in ("munge-key", "munge-run", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge-key").chmod(0o700)
        (self.root / "munge-run").chmod(0o755)
        key = self.root / "munge-key" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        user = getpass.getuser()
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024**2 * 8 // 10
        r = self.root
        self.conf.write_text(f"""\
ClusterName=neurocuratetest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={r}/munge-run/munge.socket
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen([_binary(name), *args], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env={**os.environ, **self.env})
        log.close()

    def start(self, timeout: float = 60.0) -> LocalSlurm:
        """Start munged, slurmctld and slurmd; raise RuntimeError (with the logs) when ``srun hostname`` fails."""
        self._write_config()
        r = self.root
        try:
            self._spawn("munged", ["-F", "-f", f"--socket={r}/munge-run/munge.socket",
                                   f"--key-file={r}/munge-key/munge.key", f"--log-file={r}/log/munged.log",
                                   f"--pid-file={r}/munge-run/munged.pid", f"--seed-file={r}/munge-run/munged.seed"])
            self._wait(lambda: (r / "munge-run" / "munge.socket").exists(), 10, "munged")
            self._spawn("slurmctld", ["-D", "-f", str(self.conf)])
            self._wait(lambda: self.run(["sinfo", "-h"], check=False).returncode == 0, timeout, "slurmctld")
            self._spawn("slurmd", ["-D", "-f", str(self.conf), "-N", self.node])
            self._wait(lambda: self._srun_ok(), timeout, "slurmd")
        except BaseException:
            self.stop()
            raise
        return self

    def _srun_ok(self) -> bool:
        try:
            out = self.run(["srun", "--immediate=5", "hostname"], check=False, timeout=15)
        except subprocess.TimeoutExpired:
            return False
        return out.returncode == 0 and bool(out.stdout.strip())

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{what} not ready after {timeout:.0f} s:\n{self.logs()}")

    def run(self, argv: list[str], *, check: bool = True, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout,
                              env={**os.environ, **self.env, **(env or {})})

    def jobs(self) -> list[dict[str, str]]:
        """Finished jobs from the job-completion log (``JobId``, ``Name``, ``JobState``, ``UserId``, ...)."""
        if not self.jobcomp.is_file():
            return []
        rows = []
        for line in self.jobcomp.read_text().splitlines():
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            if fields:
                rows.append(fields)
        return rows

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop the daemons this object started (by pid), slurmd first."""
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
