"""`privlm up --state-file` names the running processes, also after the supervisor restarts one."""
import json
import os
import signal
import time

import pytest

from tests.up_support import gone, processes_where, start_up, stop_up

pytestmark = [pytest.mark.slow, pytest.mark.model]


def test_state_file_follows_a_restarted_service(tmp_path, default_model):
    proc, first = start_up(tmp_path, "--no-he", "--attestation", "none", "--plaintext-dev")
    state = tmp_path / "state.json"
    try:
        old = first["gateway"]["pid"]
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            now = json.loads(state.read_text())   # renamed into place: never a partial file
            if now["gateway"]["pid"] != old:
                break
            assert proc.poll() is None, "privlm up exited"
            assert time.monotonic() < deadline, "the state file still names the killed gateway"
            time.sleep(0.2)
        new = now["gateway"]["pid"]
        assert not gone(new) and new in processes_where("ppid", proc.pid), "state names a process up did not start"
        assert now["gateway"]["port"] == first["gateway"]["port"] and now["gateway"]["restarts"] == 1
        assert now["worker"] == first["worker"]                   # untouched services keep their entry
        assert not gone(now["worker"]["pid"])
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".state.json.")], "temp file left behind"
    finally:
        stop_up(proc)
