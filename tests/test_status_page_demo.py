"""`make demo --hold`: the demo prints the status page's URL and keeps both daemons up until Ctrl-C.

The demo runs as a subprocess in a session of its own, so that the test's
SIGINT reaches it and its two daemons as a terminal's Ctrl-C reaches a
foreground job, and nothing else.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from xaind.tools.daemons import get_json, wait_until

#: Bound on each awaited step of the demo (its training takes a second or two).
STEP_TIMEOUT = 60.0


def test_demo_hold_serves_the_status_page_until_ctrl_c(tmp_path: Path) -> None:
    output = tmp_path / "demo.out"
    with open(output, "wb") as sink:
        demo = subprocess.Popen(
            [sys.executable, "-m", "xaind.tools.demo", "--participants", "2", "--rounds", "2", "--model-size", "100B", "--hold"],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def held_or_ended() -> str | None:
            text = output.read_text()
            return text if "Ctrl-C stops them" in text or demo.poll() is not None else None

        text = wait_until(held_or_ended, STEP_TIMEOUT, "the demo to hold")
        assert demo.poll() is None, text
        page_url = re.search(r"^\[demo\] status page: (http://127\.0\.0\.1:\d+/)$", text, re.MULTILINE)
        assert page_url is not None, text
        assert f"the status page is at {page_url[1]}; Ctrl-C stops them" in text

        # Held after training: the page and its /status answer, training complete.
        with urllib.request.urlopen(page_url[1], timeout=5) as answer:
            assert answer.status == 200
            assert answer.headers["content-type"] == "text/html; charset=utf-8"
            assert b"page/app.js" in answer.read()
        code, status = get_json(page_url[1] + "status")
        assert (code, status["round"], status["phase"]) == (200, 2, "complete")

        os.killpg(demo.pid, signal.SIGINT)
        assert demo.wait(STEP_TIMEOUT) == 0, output.read_text()
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(STEP_TIMEOUT)
    lines = output.read_text().splitlines()
    assert lines[-2:] == ["[demo] Ctrl-C: stopping both daemons", "[demo] both daemons stopped"], lines
    for pid in (int(pid) for pid in re.findall(r"\(pid (\d+)\)", "\n".join(lines))):
        assert not Path(f"/proc/{pid}/cmdline").exists() or b"twistd" not in Path(f"/proc/{pid}/cmdline").read_bytes(), pid
