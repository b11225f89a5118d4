"""The ops dashboard in a real browser: Debian's headless Chromium driven by Playwright.

The app is served on 127.0.0.1 with a seeded SQLite case store and telemetry in a real
influxd. A person logs in, sees the fleet, opens a device and its chart, follows a case
from its diagnosis to the owner's rating, takes over the person-needed case, writes to
the owner and closes it, and starts a campaign. Screenshots go to ``$FIXLOOP_ARTIFACTS``
(default ``build/screenshots/``); with ``FIXLOOP_UPDATE_SCREENSHOT=1`` the fleet view is
also saved as ``docs/dashboard.png`` for the README.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import pytest
from aiohttp import web
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright, expect
from test_dashboard import NOW, PASSWORDS, Clock, RecordingCampaign, Seed, ops_users, seed_fleet

from dashboard.app import create_app
from dashboard.feed import CaseFeed
from dashboard.settings import DashboardSettings
from diagnostics.engine import Mismatch
from diagnostics.service import mismatch_lines
from fixloop.stack import InfluxdServer
from notifier.sqlite import SqliteStore
from wire.influx import InfluxClient, InfluxSettings
from wire.lineproto import event_to_line, point_line
from wire.protocol import Event

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _artifacts() -> Path:
    folder = Path(os.environ.get("FIXLOOP_ARTIFACTS") or ROOT / "build" / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Served:
    url: str
    store: SqliteStore
    feed: CaseFeed
    campaign: RecordingCampaign
    seed: Seed


#: Washers that booted a newer firmware than the registry knows of.
UPDATED_WASHERS: Final = ("dev-0051", "dev-0053", "dev-0055")


async def _telemetry(influx: InfluxClient, seed: Seed) -> None:
    """A day of readings every 5 minutes for two devices, scores every 20 minutes for the
    rest (the last ten stopped three hours ago), and a boot event from every device."""
    lines = []
    start = NOW - timedelta(days=1)
    for device in seed.devices[:2]:
        for i in range(24 * 12):
            at = start + timedelta(minutes=5 * i)
            ts_ms = int(at.timestamp() * 1000)
            drift = max(0, i - 200) / 88
            lines.append(
                point_line(
                    "telemetry",
                    {"device": device.device_id},
                    {"temp_c": 4.0 + 0.3 * (i % 12) / 12 + 3 * drift, "power_w": 80.0 + i % 7},
                    ts_ms,
                )
            )
            lines.append(
                point_line(
                    "health",
                    {"device": device.device_id},
                    {"score": min(0.05 + 0.8 * drift, 1.0), "baseline": 0.1, "fleet": 0.1},
                    ts_ms,
                )
            )
    for n, device in enumerate(seed.devices[2:]):
        score = 0.62 if n % 9 == 0 else 0.35 if n % 5 == 0 else 0.08
        last = NOW - (timedelta(hours=3) if n >= 48 else timedelta(minutes=2))
        for k in range(72):
            lines.append(
                point_line(
                    "health",
                    {"device": device.device_id},
                    # healthy until eight hours ago
                    {"score": score if k < 24 else 0.08, "baseline": 0.1, "fleet": 0.1},
                    int((last - timedelta(minutes=20 * k)).timestamp() * 1000),
                )
            )
    for device in seed.devices:
        firmware = "3.1.0" if device.device_id in UPDATED_WASHERS else device.firmware
        boot = Event(
            device.device_id,
            1,
            int((NOW - timedelta(days=1)).timestamp() * 1000),
            "boot",
            code=firmware,
            data={"model": device.model, "firmware": firmware or "", "reset_reason": "power_on"},
        )
        lines.append(event_to_line(boot))
    # what the diagnostics service counted that no product file describes
    lines += mismatch_lines(
        [Mismatch("fridge-a1", True, 1234, ("door_humidity_pct",))],
        "fixloop-diagnostics",
        int((NOW - timedelta(minutes=5)).timestamp() * 1000),
    )
    outcome = await influx.write(lines)
    assert not outcome.rejected


@pytest.fixture
async def served(tmp_path: Path, influxd: InfluxdServer) -> AsyncIterator[Served]:
    settings = InfluxSettings(url=influxd.url, database=f"browser_{uuid.uuid4().hex[:8]}")
    async with SqliteStore(tmp_path / "cases.db") as store, InfluxClient(settings) as influx:
        await influx.ensure_database()
        seed = await seed_fleet(store, devices=60)
        await _telemetry(influx, seed)
        feed = CaseFeed()
        campaign = RecordingCampaign()
        app = create_app(
            store=store,
            influx=influx,
            actions=None,
            users=ops_users(),
            clock=Clock(),
            campaign=campaign,
            feed=feed,
            # scores every 20 minutes: silent after an hour without one
            settings=DashboardSettings(heartbeat_s=1.0, silent_after_s=3600.0),
        )
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        port = _free_port()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        try:
            yield Served(f"http://127.0.0.1:{port}", store, feed, campaign, seed)
        finally:
            await runner.cleanup()


@pytest.fixture(scope="session")
def chromium() -> str:
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed: apt-get install chromium"
    return CHROMIUM


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as driver:
        launched = await driver.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


async def _page(browser: Browser, errors: list[str]) -> Page:
    context = await browser.new_context(viewport={"width": 1440, "height": 900})
    page = await context.new_page()

    def console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)

    page.on("console", console)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "response",
        lambda resp: (
            errors.append(f"HTTP {resp.status} {resp.url}") if resp.status >= 400 else None
        ),
    )
    return page


async def _login(page: Page, url: str, username: str, errors: list[str]) -> None:
    await page.goto(f"{url}/ops/")
    await expect(page.locator("#login-form")).to_be_visible()
    await page.fill("#username", username)
    await page.fill("#password", PASSWORDS[username])
    await page.click("#login-form button[type=submit]")
    await expect(page.locator("#who")).to_contain_text(username.title())
    # the browser logs the 401s of the session probe and of refused logins before this
    errors.clear()


async def test_an_ops_day_in_the_browser(served: Served, browser: Browser) -> None:
    errors: list[str] = []
    page = await _page(browser, errors)
    shots = _artifacts()

    # a wrong password is refused on the page
    await page.goto(f"{served.url}/ops/")
    await page.fill("#username", "ada")
    await page.fill("#password", "not it")
    await page.click("#login-form button[type=submit]")
    await expect(page.locator("#login-error")).to_have_text("wrong user name or password")
    # log in, see the fleet
    await _login(page, served.url, "ada", errors)
    await expect(page.locator("#fleet-devices")).to_have_text("60")
    await expect(page.locator("#by-model")).to_contain_text("fridge-a1")
    mismatch = page.locator("#product-mismatch")
    await expect(mismatch).to_contain_text("door_humidity_pct")
    await expect(mismatch).to_contain_text("1234")
    await expect(page.locator("#live")).to_contain_text("live")
    await expect(page.locator("#chart-fleet-health canvas")).to_have_count(1)
    await expect(page.locator("#chart-failure-rates canvas")).to_have_count(1)
    # the day's health is counted behind the first answer; the page draws it again
    await expect(page.locator("#chart-fleet-health")).to_have_attribute(
        "data-pending", "0", timeout=30_000
    )
    await page.screenshot(path=str(shots / "fleet.png"), full_page=True)
    if os.environ.get("FIXLOOP_UPDATE_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shots / "fleet.png", ROOT / "docs" / "dashboard.png")

    # a live case change reaches the page without reloading; the page then refreshes the
    # view on its own, saying so, so that the refresh does not extend the session
    moved = replace(served.seed.open_case, state="remote_fix")
    async with page.expect_request(
        lambda request: (
            request.url.endswith("/ops/api/fleet")
            and request.headers.get("x-ops-background") == "1"
        )
    ):
        served.feed.publish(moved)
        await expect(page.locator("#live")).to_contain_text(f"{moved.device_id}: remote fix")

    # open a device and its chart
    await page.click("a.device-link >> nth=0")
    await expect(page.locator("#device-chart canvas")).to_have_count(1)
    await expect(page.locator("#device-chart .u-legend")).to_contain_text("score (mean)")
    await page.click("text=7d")
    await expect(page.locator("#device-chart canvas")).to_have_count(1)
    await page.screenshot(path=str(shots / "device.png"), full_page=True)

    # follow a case from diagnosis to rating
    await page.click("#nav a[data-view=cases]")
    card = page.locator('.column[data-stage="escalated"] .case-card[data-case-id="case-rated"]')
    await expect(card).to_be_visible()
    await page.screenshot(path=str(shots / "cases.png"), full_page=True)
    await card.click()
    audit = page.locator("#audit li")
    await expect(audit.first).to_contain_text("diagnostics named door_seal_leak")
    await expect(audit.last).to_contain_text("low rating (2 of 5)")
    await expect(page.locator("#audit")).to_contain_text("sent defrost_cycle")
    await expect(page.locator("#rating")).to_contain_text("still noisy at night")
    await expect(page.locator("#owner-name")).to_contain_text("Grace Hopperton")
    await expect(page.locator("#audit")).not_to_contain_text("SECRET")
    await page.screenshot(path=str(shots / "case.png"), full_page=True)

    # take over the person-needed case, write to the owner, close it
    await page.click("#nav a[data-view=queue]")
    task = page.locator('.task[data-task-id="task-1"]')
    await task.locator("button.take").click()
    await expect(task).to_contain_text("taken by ada")
    await task.locator("textarea").fill("We are sorry about the noise; a technician will call.")
    await task.locator("button.write").click()
    await expect(page.locator("#toast")).to_contain_text("Message stored")
    await page.screenshot(path=str(shots / "queue.png"), full_page=True)
    await task.locator("button.close-resolved").click()
    await expect(page.locator("#queue-empty")).to_be_visible()
    case = await served.store.get_case("case-rated")
    assert case is not None
    assert case.state == "resolved"
    messages = [n for n in await served.store.notifications("own-1") if n.kind == "ops_message"]
    assert [m.body for m in messages] == ["We are sorry about the noise; a technician will call."]

    # the calendar and the outcomes
    await page.click("#nav a[data-view=calendar]")
    await expect(page.locator("#week .visit")).to_contain_text("Tom Tech")
    await page.screenshot(path=str(shots / "calendar.png"), full_page=True)
    await page.click("#nav a[data-view=outcomes]")
    await expect(page.locator("#fixed-remotely")).to_have_text("100%")
    await page.screenshot(path=str(shots / "outcomes.png"), full_page=True)

    # start a campaign for the firmware cluster
    await page.click("#nav a[data-view=insight]")
    row = page.locator("#clusters tr", has_text="1.5.2").filter(has_text="compressor stall")
    await expect(row).to_have_count(1)
    page.once("dialog", lambda dialog: dialog.accept("firmware_update"))
    await row.locator("button.campaign").click()
    await expect(page.locator("#campaign-result")).to_contain_text("Campaign started")
    [(device_ids, action, _)] = served.campaign.calls
    assert action == "firmware_update"
    assert device_ids == sorted(d.device_id for d in served.seed.devices if d.firmware == "1.5.2")
    await page.screenshot(path=str(shots / "insight.png"), full_page=True)

    # log out: the API answers 401 and the login form is back
    await page.click("#logout")
    await expect(page.locator("#login-form")).to_be_visible()
    assert errors == []


async def test_a_viewer_gets_no_buttons_that_change_anything(
    served: Served, browser: Browser
) -> None:
    errors: list[str] = []
    page = await _page(browser, errors)
    await _login(page, served.url, "vera", errors)
    await page.click("#nav a[data-view=queue]")
    task = page.locator('.task[data-task-id="task-1"]')
    await expect(task).to_contain_text("Agents can take this over.")
    await expect(task.locator("button")).to_have_count(0)
    await page.click("#nav a[data-view=insight]")
    await expect(page.locator("#clusters")).to_contain_text("admins can start a campaign")
    await expect(page.locator("button.campaign")).to_have_count(0)
    await page.click("#nav a[data-view=cases]")
    await page.click('.case-card[data-case-id="case-rated"]')
    await expect(page.locator("#audit")).to_be_visible()
    await expect(page.locator("#owner-name")).to_have_count(0)
    assert errors == []


async def _chart_data(page: Page, url: str, name: str, query: str) -> dict[str, Any]:
    """The chart's table as the API gives it, read with the page's own session."""
    resp = await page.request.get(f"{url}/ops/api/charts/{name}{query}")
    assert resp.ok
    data: dict[str, Any] = await resp.json()
    return data


async def _drawn(page: Page, box: str, data: dict[str, Any], series: int) -> None:
    """The chart in ``box`` is drawn: a canvas, one legend row per series, every point."""
    chart = page.locator(f"#{box}")
    await expect(chart.locator("canvas")).to_have_count(1)
    await expect(chart).to_have_attribute("data-series", str(series))
    await expect(chart).to_have_attribute("data-points", str(len(data["rows"])))
    # uPlot's legend: one row for the x value, one per series
    await expect(chart.locator(".u-legend .u-series")).to_have_count(series + 1)


async def _download(page: Page, name: str, data: dict[str, Any]) -> list[list[str]]:
    """Click the chart's CSV link; the file is the chart's table with a header row."""
    async with page.expect_download() as info:
        await page.click(f'a.csv[data-chart="{name}"]')
    download = await info.value
    assert download.suggested_filename == f"fixloop-{name}-2024-05-15.csv"
    saved = await download.path()
    rows = list(csv.reader(io.StringIO(saved.read_text(encoding="utf-8"), newline="")))
    assert rows[0] == data["columns"]
    assert rows[1:] == [["" if v is None else str(v) for v in row] for row in data["rows"]]
    return rows


async def test_charts_draw_their_data_and_download_as_csv(served: Served, browser: Browser) -> None:
    errors: list[str] = []
    page = await _page(browser, errors)
    shots = _artifacts()
    await _login(page, served.url, "vera", errors)

    # the fleet: ten devices stopped reporting three hours ago and show as silent
    await expect(page.locator("#fleet-silent")).to_have_text("10")
    await expect(page.locator("#by-firmware")).to_contain_text("3.1.0")
    # the first look at the day counts its steps behind the answer: the chart says how
    # many are pending and is drawn again until none are
    await expect(page.locator("#chart-fleet-health")).to_have_attribute(
        "data-pending", "0", timeout=30_000
    )
    health = await _chart_data(page, served.url, "fleet-health", "?range=24h")
    assert health["pending"] == 0
    assert health["columns"] == ["time", "healthy", "watch", "anomalous", "silent", "unknown"]
    await _drawn(page, "chart-fleet-health", health, len(health["columns"]) - 1)
    legend = page.locator("#chart-fleet-health .u-legend")
    for label in ("healthy", "watch", "anomalous", "silent", "no score"):
        await expect(legend).to_contain_text(label)
    assert health["rows"][-1][4] == 10  # silent now
    assert max(row[1] for row in health["rows"]) == 60  # all healthy last night
    failures = await _chart_data(page, served.url, "failure-rates", "")
    assert {row[0] for row in failures["rows"]} == {"firmware", "batch"}
    await _drawn(page, "chart-failure-rates", failures, 2)
    await _download(page, "fleet-health", health)
    rows = await _download(page, "failure-rates", failures)
    assert ["firmware", "washer-w3", "3.1.0", "3", "0", "0.0"] in rows
    await page.screenshot(path=str(shots / "fleet-charts.png"), full_page=True)

    # another range: drawn again from that range's data
    await page.click("#view button:text-is('7d')")
    await expect(page.locator("#chart-fleet-health")).to_have_attribute("data-query", "?range=7d")
    await expect(page.locator("#chart-fleet-health")).to_have_attribute(
        "data-pending", "0", timeout=30_000
    )
    week = await _chart_data(page, served.url, "fleet-health", "?range=7d")
    await expect(page.locator("#chart-fleet-health")).to_have_attribute(
        "data-points", str(len(week["rows"]))
    )
    assert len(week["rows"]) != len(health["rows"])
    await _download(page, "fleet-health", week)

    # the silent tile lists the silent devices
    await page.click("a.tile.silent")
    await expect(page.locator("#devices tbody tr")).to_have_count(10)
    await expect(page.locator("#devices")).not_to_contain_text("healthy")
    ids = await page.locator("#devices tbody tr td:first-child").all_inner_texts()
    assert sorted(ids) == [d.device_id for d in served.seed.devices[50:]]

    # the outcomes: cases per day and the share fixed remotely with the ratings
    await page.click("#nav a[data-view=outcomes]")
    cases = await _chart_data(page, served.url, "cases", "?days=30")
    await _drawn(page, "chart-cases", cases, 3)
    # every seeded case was opened within the last 30 days
    assert sum(row[1] for row in cases["rows"]) == len(await served.store.cases(limit=1000))
    fixes = await _chart_data(page, served.url, "fixes", "?days=30")
    await _drawn(page, "chart-fixes", fixes, 2)
    await _download(page, "cases", cases)
    await _download(page, "fixes", fixes)
    await page.screenshot(path=str(shots / "outcomes-charts.png"), full_page=True)

    # a device that booted a newer firmware says so on its page
    await page.goto(f"{served.url}/ops/#/device/dev-0051")
    facts = page.locator("#device-facts")
    await expect(facts).to_contain_text("firmware 3.1.0 (from its last boot)")
    await expect(page.locator("#view h1 .badge")).to_have_text("silent")

    # the charts' data needs the session: after logout the CSV address answers 401
    await page.click("#logout")
    await expect(page.locator("#login-form")).to_be_visible()
    resp = await page.request.get(f"{served.url}/ops/api/charts/cases.csv")
    assert resp.status == 401
    assert errors == []
