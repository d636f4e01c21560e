"""The live page (/ui) in a real headless Chromium (Debian's, driven by Playwright) against a
running stack: real Envoy, Redis, the control plane and two ext_proc replicas. It shows every
policy and replica, and its charts move while load runs (read from the page's DOM). Skipped
without /usr/bin/chromium, except under CI (.ci/run installs it)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlproxy.client import Client
from mlproxy.stack import Stack

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
READER = "ui-read-token-0123456789abcdef"
if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the live page test: apt-get install chromium")
    pytest.skip(
        "no Chromium: `apt-get install chromium` to run the live page test",
        allow_module_level=True,
    )

sync_api = pytest.importorskip("playwright.sync_api")

# The flags the machine notes give for Chromium on a closed network, as root.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROW = [0.5] * 16  # one input of the demo model


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        envoy_port=0,
        replicas=2,
        run_dir=tmp_path_factory.mktemp("ui"),
        controlplane_env={"MLPROXY_READ_TOKENS": f"ui:{READER}"},
    )
    stack.start()
    try:
        api = Client(stack.controlplane_url, stack.admin_token)
        demo = api.get_policy("demo")
        hostile = {
            "match": {"path": "/v1/<img src=x onerror=document.title='owned'>/<b>bold</b>"},
            "backend": {"url": demo["backend"]["url"].replace("{model}", "demo")},
        }
        api.put_policy("markup", hostile)
        yield stack
    finally:
        stack.stop()


class Load:
    """Requests to the demo model through Envoy from a few threads until stopped."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url = f"{url}/v1/models/demo:predict"
        self.stopped = threading.Event()
        self.ok = 0
        self.failed = 0
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        body = json.dumps({"instances": [ROW]}).encode()
        while not self.stopped.is_set():
            req = urllib.request.Request(
                self.url, body, {"content-type": "application/json"}, method="POST"
            )
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    resp.read()
                    self.ok += 1
            except OSError:
                self.failed += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        for t in self._threads:
            t.join(15)


def chart_value(page: Any, policy: str, series: str) -> tuple[int, float | None]:
    svg = page.locator(f'div.policy[data-policy="{policy}"] svg[data-series="{series}"]')
    points = int(svg.get_attribute("data-points") or 0)
    last = svg.get_attribute("data-last")
    return points, float(last) if last else None


def test_the_live_page_shows_policies_replicas_and_moving_charts(
    live: Stack, tmp_path: Path
) -> None:
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            response = page.goto(f"{live.controlplane_url}/ui?refresh=1")
            assert response is not None and response.status == 200
            assert "script-src 'self'" in response.headers["content-security-policy"]

            page.fill("#token", "not-a-token-of-this-control-plane")
            page.click("button[type=submit]")
            # (Locator waits, not JavaScript: the page's CSP forbids evaluating strings.)
            expect = sync_api.expect
            expect(page.locator("#status.error")).to_contain_text("refused the token")
            assert page.locator("#policies tbody tr").count() == 0

            page.fill("#token", READER)
            page.click("button[type=submit]")
            expect(page.locator("#replicas tbody tr")).to_have_count(2, timeout=60_000)
            expect(page.locator("#policies tbody tr")).to_have_count(2, timeout=60_000)
            names = page.locator("#policies tbody tr").evaluate_all(
                "rows => rows.map(r => r.dataset.policy)"
            )
            assert sorted(names) == ["demo", "markup"]
            replicas = page.locator("#replicas tbody tr").evaluate_all(
                "rows => rows.map(r => r.dataset.replica)"
            )
            assert sorted(replicas) == ["extproc-0", "extproc-1"]
            demo = page.locator('#policies tr[data-policy="demo"]')
            expect(demo).to_contain_text("2/2 complete", timeout=60_000)
            # markup in a policy is shown as text, never run or parsed
            markup = page.locator('#policies tr[data-policy="markup"]').inner_text()
            assert "<img src=x onerror=document.title='owned'>" in markup
            assert page.locator("#policies img, #policies b").count() == 0
            assert page.title() == "MLProxy"

            before_points, before_rate = chart_value(page, "demo", "rate")
            with Load(live.envoy_url) as load:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    points, rate = chart_value(page, "demo", "rate")
                    _, p95 = chart_value(page, "demo", "latency")
                    _, batch = chart_value(page, "demo", "batch")
                    if rate and p95 and batch and points > before_points + 3:
                        break
                    time.sleep(0.5)
                time.sleep(1.5)  # one more poll, for the screenshot
                shot = os.environ.get("MLPROXY_UI_SCREENSHOT") or str(tmp_path / "ui.png")
                page.screenshot(path=shot, full_page=True)
            assert load.ok > 0
            assert rate is not None and rate > (before_rate or 0.0), (rate, before_rate)
            assert p95 is not None and p95 > 0
            assert batch is not None and batch >= 1
            assert points > before_points + 3
            assert demo.locator('[data-field="latency"]').inner_text().endswith(" ms (p99)")
            assert float(demo.locator('[data-field="rate"]').inner_text()) > 0
            heartbeat = page.locator('#replicas [data-field="heartbeat"]').first.inner_text()
            assert heartbeat.endswith(" s ago") and int(heartbeat.split()[0]) < 10
            assert errors == []
        finally:
            browser.close()


def test_the_page_is_served_with_a_strict_policy_and_holds_no_data(live: Stack) -> None:
    with urllib.request.urlopen(f"{live.controlplane_url}/ui/", timeout=10) as resp:
        html = resp.read().decode()
        headers = resp.headers
    assert headers["content-security-policy"].startswith("default-src 'none'")
    assert headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in html and "demo" not in html  # no inline script, no data
    for asset in ("app.js", "app.css"):
        with urllib.request.urlopen(f"{live.controlplane_url}/ui/{asset}", timeout=10) as r:
            assert r.status == 200 and r.headers["content-security-policy"]
