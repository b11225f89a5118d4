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
from wire.protocol.credentials import derive

pytestmark = pytest.mark.integration

# straight to loopback, whatever proxy the environment names
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _whoami(base: str, cookie: str) -> int:
    """GET the session's own record with a session cookie; return the status."""
    request = urllib.request.Request(
        f"{base}api/session", headers={"Cookie": cookie.split(";", 1)[0]}
    )
    try:
        with _OPENER.open(request, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _login(url: str, password: str, username: str = "ops") -> tuple[int, str]:
    """POST a login from the public URL's origin; return the status and ``Set-Cookie``."""
    request = urllib.request.Request(
        url,
        data=json.dumps({"username": username, "password": password}).encode(),
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


def test_up_takes_the_ops_users_of_its_data_folder(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIXLOOP_")}
    env["FIXLOOP_DASHBOARD__PUBLIC_URL"] = "https://ops.example.com/ops/"
    added = subprocess.run(
        [
            *(sys.executable, "-m", "fixloop", "ops-users", "add", "alice"),
            *("--role", "admin", "--data-dir", str(tmp_path)),
        ],
        input="alice's long password\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    users_file = tmp_path / "ops-users.json"
    assert "alice" in json.loads(users_file.read_text())["users"]
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
        match = re.search(
            r"dashboard (http://\S+/ops/)  \(log in as an ops user of (\S+): alice\)", text
        )
        assert match, text
        assert Path(match.group(2)).resolve() == users_file.resolve()
        assert "password" not in text.split("dashboard", 1)[1].split("\n", 1)[0]
        login = f"{match.group(1)}login"
        status, cookie = _login(login, "alice's long password", "alice")
        assert status == 200
        assert _whoami(match.group(1), cookie) == 200
        # the demo's generated user is not made beside the folder's users
        secret = (tmp_path / "fleet_secret").read_text().strip()
        demo_password = derive(secret, "demo ops password", "ops").hex()[:16]
        assert _login(login, demo_password, "ops")[0] == 401
        # a user removed while up runs loses the session already open, not only the login
        removed = subprocess.run(
            [
                *(sys.executable, "-m", "fixloop", "ops-users", "remove", "alice"),
                *("--data-dir", str(tmp_path)),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert removed.returncode == 0, removed.stderr
        deadline = time.monotonic() + 30
        while (seen := _whoami(match.group(1), cookie)) == 200:
            assert time.monotonic() < deadline, "alice's session outlived her removal"
            time.sleep(0.2)
        assert seen == 401
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
