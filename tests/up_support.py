"""Running `privlm up` as a subprocess in tests, and reading the process table from /proc."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def processes_where(field: str, value: int) -> list[int]:
    """Live (non-zombie) pids whose parent ('ppid') or process group ('pgid') is `value`."""
    index = {"ppid": 1, "pgid": 2}[field]
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[index]) == value and fields[0] != "Z":
                    out.append(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def gone(pid: int) -> bool:
    """No such process, or only a zombie (it holds nothing; its parent reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def start_up(tmp_path: Path, *extra: str, timeout: float = 300, **popen) -> tuple[subprocess.Popen, dict]:
    """Start `privlm up --port 0 ...` and wait for its state file: (process, state)."""
    state = tmp_path / "state.json"
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.STDOUT)
    proc = subprocess.Popen([sys.executable, "-m", "privlm.cli", "up", "--port", "0", "--state-file", str(state),
                             "--log-dir", str(tmp_path / "logs"), *extra], cwd=ROOT, text=True, **popen)
    deadline = time.monotonic() + timeout
    while not state.exists():
        if proc.poll() is not None:
            raise AssertionError(f"privlm up exited early: {proc.stdout.read() if proc.stdout else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("privlm up did not come up in time")
        time.sleep(0.5)
    return proc, json.loads(state.read_text())


def service_pids(state: dict) -> dict[str, int]:
    return {name: svc["pid"] for name, svc in state.items() if isinstance(svc, dict) and "pid" in svc}


def stop_up(proc: subprocess.Popen, timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
