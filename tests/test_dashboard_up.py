"""``fixloop up`` serves the dashboard with the ``[dashboard]`` settings it was given."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dashboard.app import COOKIE_NAME

pytestmark = pytest.mark.integration

# straight to loopback, whatever proxy the environment names
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _login(url: str, password: str) -> tuple[int, str]:
    """POST a login from the public URL's origin; return the status and ``Set-Cookie``."""
    request = urllib.request.Request(
        url,
        data=json.dumps({"username": "ops", "password": password}).encode(),
        headers={"Content-Type": "application/json", "Origin": "https://ops.example.com"},
    )
    try:
        with _OPENER.open(request, timeout=10) as resp:
            return resp.status, resp.headers.get("Set-Cookie", "")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def test_up_hands_the_dashboard_section_to_the_dashboard(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "FIXLOOP_DASHBOARD__PUBLIC_URL": "https://ops.example.com/ops/",
        "FIXLOOP_DASHBOARD__LOGIN_MAX_FAILURES": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "fixloop", "up", "--data-dir", str(tmp_path), "--devices", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        banner: list[str] = []
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            banner.append(line)
            if line.startswith("Press Ctrl-C"):
                break
            assert time.monotonic() < deadline, "".join(banner)
        text = "".join(banner)
        match = re.search(r"dashboard (http://\S+/ops/)  \(log in as ops, password (\w+)\)", text)
        assert match, text
        login, password = f"{match.group(1)}login", match.group(2)
        # the public URL's origin is not cross-site, and its https makes the cookie Secure
        status, cookie = _login(login, password)
        assert status == 200
        assert cookie.startswith(f"{COOKIE_NAME}=")
        assert "Secure" in cookie
        # one free failure (login_max_failures = 1), then this address waits
        assert [_login(login, "wrong")[0] for _ in range(2)] == [401, 429]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
