"""The status page in a real browser, during a real training, with the network cut off.

Both daemons run as `twistd -n` processes on loopback (`xaind.tools.daemons.federation`);
three participants of `xaind.sdk` run in a subprocess, each training taking
`TRAINING_SECONDS`, so that a round lasts long enough to be seen. Debian's
headless Chromium (`/usr/bin/chromium`) is driven through Debian's chromedriver
(`/usr/bin/chromedriver`) with selenium; no driver or browser is ever downloaded
(skipped, saying so, where they or selenium are not installed: `apt-get install
chromium chromium-driver`; .ci/run installs them on the CI machine and sets
XAIND_REQUIRE_BROWSER=1, which makes a missing browser a failure instead).

The browser's network is cut: no host name resolves (not even `localhost`) and
every connection but to the loopback address goes to a proxy that refuses it
(Chromium never proxies loopback); the test shows both before it opens the page
at http://127.0.0.1:<port>/. It checks that:

- the displayed round advances, several times, without a reload (a marker set
  on `window` after the load is still there, and there was one navigation);
- the participant counts, the round and the phase shown agree with `/status`
  fetched at about the same time (waited for: the page asks every second);
- when training is complete the page says so, its chart has a bar per finished
  round, and it lists as many warnings and errors as `/status`;
- the page loaded and fetched nothing but from the coordinator's origin, and
  logged no error on the console;
- once the coordinator stops, the page says it is not answering.

A screenshot taken mid-training is saved as `status-page.png` in the test's
tmp directory and copied to build/test-artefacts/status-page.png of the
checkout (both paths printed).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xaind.protocol import COORDINATOR_HTTP_LISTENER
from xaind.tools import daemons
from xaind.tools.daemons import Federation, free_loopback_port, wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

#: Set to 1 (as .ci/run does, having installed them) to fail instead of skipping without a browser.
REQUIRE_BROWSER = "XAIND_REQUIRE_BROWSER"

try:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
except ImportError:  # the test extra installs it; Debian: python3-selenium
    webdriver = None

    class WebDriverException(Exception):  # type: ignore[no-redef]
        """Stands in for selenium's when it is not installed (the test is skipped then)."""

    Service = None  # type: ignore[assignment,misc]


def missing_browser() -> str | None:
    """Why the browser cannot be driven here, or None."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        return f"needs Debian's {' and '.join(missing)} (apt-get install chromium chromium-driver)"
    if webdriver is None:
        return "needs selenium (pip install -e '.[test]'; Debian: python3-selenium)"
    return None


ROOT = Path(__file__).resolve().parent.parent
#: Where the screenshot is copied in a checkout, for CI and people to look at.
ARTEFACT = ROOT / "build" / "test-artefacts" / "status-page.png"

ROUNDS = 6
PARTICIPANTS = 3
TRAINING_SECONDS = 1.2
HEARTBEAT_PERIOD = 0.2
#: Bound on each awaited step: a round takes about TRAINING_SECONDS plus a heartbeat or two.
STEP_TIMEOUT = 30.0
#: Pause between two looks at the page (a poll of the DOM, not a synchronisation).
LOOK_INTERVAL = 0.1

#: Participants of the SDK that take TRAINING_SECONDS per round: argv is the URL, the count, the delay, the period.
PARTICIPANTS_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from twisted.internet import reactor
    from twisted.internet.defer import DeferredList
    from xaind.sdk import Participant, start_participant

    url, count, delay, period = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])

    class Slow(Participant):
        def train_round(self, weights):
            time.sleep(delay)
            return (np.zeros(4, dtype=np.float32) if weights is None else weights + 1.0), 10

    def begin():
        done = [start_participant(Slow(), url, reactor=reactor, heartbeat_period=period, name=f"p{n}")[1] for n in range(count)]
        DeferredList(done, consumeErrors=True).addCallback(finished)

    def finished(results):
        failed = [outcome for ok, outcome in results if not ok]
        for failure in failed:
            print(failure.getTraceback(), flush=True)
        print(f"{len(results) - len(failed)} participant(s) finished", flush=True)
        reactor.stop()

    reactor.callWhenRunning(begin)
    reactor.run()
    """
)


# -- the browser ----------------------------------------------------------------------------------


def chromium(refusing_proxy_port: int) -> Any:
    """Headless Chromium through Debian's chromedriver, cut off from everything but 127.0.0.1."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # The console's messages, to show the page ran without an error (a script's, or a policy's refusal).
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for argument in (
        "--headless=new",
        "--no-sandbox",  # the tests may run as root (CI does)
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1040",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        # No name resolves but the loopback address, and any connection goes to a proxy that refuses it.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        f"--proxy-server=http://127.0.0.1:{refusing_proxy_port}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(STEP_TIMEOUT)
    return driver


@pytest.fixture
def browser() -> Iterator[Any]:
    reason = missing_browser()
    if reason is not None:
        if os.environ.get(REQUIRE_BROWSER) == "1":
            pytest.fail(f"${REQUIRE_BROWSER} is 1, but the test {reason}")
        pytest.skip(reason)
    driver = chromium(free_loopback_port())
    try:
        yield driver
    finally:
        driver.quit()


#: What the page shows, read in one script run (one instant of the page).
READ_PAGE = """
const text = (id) => document.getElementById(id).textContent;
const states = ["waiting", "selected", "done", "done_inactive", "ignored"];
return {
  marker: window.statusPageTestMarker === undefined ? null : window.statusPageTestMarker,
  navigations: performance.getEntriesByType("navigation").length,
  connection: document.body.dataset.connection,
  connectionText: text("connection"),
  polls: Number(document.body.dataset.polls || 0),
  round: text("round"),
  rounds: text("rounds"),
  phase: text("phase"),
  link: text("link"),
  sinceAggregation: text("since-aggregation"),
  participants: Object.fromEntries(states.map((state) => [state, text(`count-${state}`)])),
  chartBars: document.querySelectorAll("#chart rect.bar").length,
  problems: Array.from(document.querySelectorAll("#problems li .text"), (item) => item.textContent),
};
"""


def read_page(driver: Any) -> dict[str, Any]:
    return driver.execute_script(READ_PAGE)


def shown(status: dict[str, Any]) -> dict[str, Any]:
    """What the page should show for `status`, in the page's own terms (texts)."""
    return {
        "round": str(status["round"]),
        "phase": status["phase"],
        "participants": {state: str(count) for state, count in status["participants"].items()},
    }


def agrees(page: dict[str, Any], status: dict[str, Any]) -> bool:
    return {key: page[key] for key in ("round", "phase", "participants")} == shown(status)


def navigation_to(driver: Any, url: str) -> str:
    """Where navigating to `url` ends: "reached", or the browser's network error."""
    try:
        driver.get(url)
    except WebDriverException as error:
        return error.msg.splitlines()[0] if error.msg else repr(error)
    landed = driver.execute_script("return document.documentURI;")
    return "reached" if landed.startswith(url) else f"an error page ({landed})"


# -- the training ---------------------------------------------------------------------------------


@contextlib.contextmanager
def slow_participants(fed: Federation, directory: Path) -> Iterator[subprocess.Popen[bytes]]:
    output = directory / "participants.out"
    with open(output, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-c", PARTICIPANTS_SCRIPT, fed.http_url, str(PARTICIPANTS), str(TRAINING_SECONDS), str(HEARTBEAT_PERIOD)],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def save_screenshot(driver: Any, directory: Path) -> Path:
    path = directory / "status-page.png"
    assert driver.save_screenshot(str(path)), "the browser took no screenshot"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"status page screenshot (mid-training): {path}")
    # In a checkout (not in a package build, whose tree is installed): where CI and people look.
    if (ROOT / ".git").exists():
        ARTEFACT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, ARTEFACT)
        print(f"status page screenshot copied to {ARTEFACT}")
    return path


def test_the_page_follows_a_training_live_with_the_network_cut_off(tmp_path: Path, browser: Any) -> None:
    with daemons.federation(
        tmp_path,
        secret="status-page-test-secret",
        rounds=ROUNDS,
        min_clients=PARTICIPANTS,
        heartbeat_timeout=5.0,
        admit_timeout=5.0,
        training_timeout=30.0,
    ) as fed:
        origin = fed.http_url

        # The network is cut. By name, even the coordinator is out of reach (`localhost` would resolve to
        # where it listens); any other address goes to the refusing proxy; 127.0.0.1 alone is reached.
        port = fed.coordinator.ports[COORDINATOR_HTTP_LISTENER]
        assert "ERR_NAME_NOT_RESOLVED" in navigation_to(browser, f"http://localhost:{port}/status")
        assert "ERR_PROXY_CONNECTION_FAILED" in navigation_to(browser, "http://192.0.2.1/")
        assert "ERR_PROXY_CONNECTION_FAILED" in navigation_to(browser, "http://example.com/")
        assert navigation_to(browser, f"{origin}/status") == "reached"
        browser.get_log("browser")  # read, so emptied: what those navigations logged is not the page's

        browser.get(f"{origin}/")
        first = wait_until(lambda: (page := read_page(browser))["polls"] >= 1 and page, STEP_TIMEOUT, "the page's first poll")
        assert first["connection"] == "live"
        assert (first["round"], first["rounds"], first["phase"]) == ("0", str(ROUNDS), "training")
        assert first["link"] == "attached"
        assert first["sinceAggregation"] == "none yet"
        browser.execute_script("window.statusPageTestMarker = arguments[0];", "loaded-once")

        with slow_participants(fed, tmp_path) as participants:
            # The round shown advances by itself, several times, on the page loaded once.
            rounds_seen: list[int] = []
            screenshot: Path | None = None
            deadline = time.monotonic() + STEP_TIMEOUT * 2
            while True:
                page = read_page(browser)
                assert page["marker"] == "loaded-once", "the page was reloaded"
                assert page["navigations"] == 1
                if not rounds_seen or int(page["round"]) != rounds_seen[-1]:
                    rounds_seen.append(int(page["round"]))
                if screenshot is None and int(page["round"]) >= 3 and page["phase"] == "training" and page["chartBars"] >= 3:
                    screenshot = save_screenshot(browser, tmp_path)
                if screenshot is not None and len(rounds_seen) >= 4:
                    break
                assert time.monotonic() < deadline, f"the page showed rounds {rounds_seen} only: {page}\n{fed.describe()}"
                time.sleep(LOOK_INTERVAL)
            assert rounds_seen == sorted(rounds_seen) and len(set(rounds_seen)) >= 4, rounds_seen

            # Mid-training, the page and /status agree (the page asks every second: wait for its next look).
            def agreeing_mid_training() -> tuple[dict[str, Any], dict[str, Any]] | None:
                page = read_page(browser)
                status = fed.status()
                if status["phase"] == "complete":
                    raise AssertionError(f"training ended before the page agreed with /status: {page} vs {shown(status)}")
                return (page, status) if agrees(page, status) else None

            page, status = wait_until(agreeing_mid_training, STEP_TIMEOUT, "the page to show the counts of /status mid-training")
            assert sum(int(count) for count in page["participants"].values()) == PARTICIPANTS, page

            participants.wait(STEP_TIMEOUT * 2)
            assert participants.returncode == 0, (tmp_path / "participants.out").read_text()

        # Training complete: the page says so, with a bar per finished round.
        status = fed.wait_for_status(lambda status: status["phase"] == "complete", "training to complete")

        def complete_and_agreeing() -> dict[str, Any] | None:
            page = read_page(browser)
            status = fed.status()
            return page if agrees(page, status) else None

        page = wait_until(complete_and_agreeing, STEP_TIMEOUT, "the page to show the completed training")
        assert (page["round"], page["phase"]) == (str(ROUNDS), "complete")
        assert page["chartBars"] == len(status["finished_rounds"]) == ROUNDS
        assert page["sinceAggregation"].endswith(" ago"), page
        assert page["marker"] == "loaded-once" and page["navigations"] == 1

        # It loaded and fetched from the coordinator only.
        requested = browser.execute_script(
            "return performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource')).map((e) => e.name);"
        )
        assert {f"{origin}/", f"{origin}/page/style.css", f"{origin}/page/app.js", f"{origin}/status"} <= set(requested)
        assert all(name.startswith(f"{origin}/") for name in requested), requested
        # Without an error on the console: no script error, nothing refused by the page's own policy.
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == [], errors

        # The aggregator goes away: the link shows it, and the coordinator's warning is listed as in /status.
        fed.aggregator.stop()

        def link_lost_and_listed() -> dict[str, Any] | None:
            page = read_page(browser)
            problems = [f"{problem['source']}: {problem['text']}" for problem in reversed(fed.status()["recent_problems"])]
            return page if page["link"] == "not attached" and problems and page["problems"] == problems else None

        page = wait_until(link_lost_and_listed, STEP_TIMEOUT, "the page to show the aggregator detached and the warning")
        assert any("aggregator detached" in problem for problem in page["problems"]), page

        # The coordinator stops answering: the page says so, keeping what it showed last.
        with_answers = page
        fed.coordinator.stop()
        page = wait_until(
            lambda: (page := read_page(browser))["connection"] == "lost" and page, STEP_TIMEOUT, "the page to notice the coordinator is gone"
        )
        assert "not answering" in page["connectionText"], page
        assert (page["round"], page["phase"]) == (with_answers["round"], with_answers["phase"])
        assert page["marker"] == "loaded-once"

