"""The local stack runners and the broker security they render, against real servers.

ACL and password checks use the ``mosquitto_pub``/``mosquitto_sub`` clients, so they
test the broker's own view of the files, not our client library's.
"""

from __future__ import annotations

import base64
import queue
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest
from conftest import (
    DEVICE_IDS,
    FLEET_SECRET,
    GATEWAY_PASSWORD,
    MakeInfluxd,
    MakeMosquitto,
    device_pw,
)

from fixloop.broker import (
    DEFAULT_MAX_QUEUED_MESSAGES,
    GATEWAY_USER,
    Listener,
    hash_password,
    render_acl,
    render_mosquitto_conf,
    render_password_file,
)
from fixloop.server import free_port
from fixloop.stack import InfluxdServer, MosquittoServer
from wire.errors import ConfigError

pytestmark = pytest.mark.integration

DEV1, DEV2, _ = DEVICE_IDS
WAIT_S = 5.0


def _auth(broker: MosquittoServer, user: str, password: str) -> list[str]:
    return ["-h", broker.host, "-p", str(broker.port), "-u", user, "-P", password]


def publish(
    broker: MosquittoServer,
    user: str,
    password: str,
    topic: str,
    message: str,
    *extra: str,
) -> subprocess.CompletedProcess[str]:
    """Publish one QoS 1 message with mosquitto_pub; returns the finished process."""
    command = ["mosquitto_pub", *_auth(broker, user, password), "-q", "1"]
    return subprocess.run(
        [*command, "-t", topic, "-m", message, *extra],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )


class Subscriber:
    """A running mosquitto_sub whose messages arrive as ``(topic, payload)``."""

    def __init__(
        self,
        broker: MosquittoServer,
        user: str,
        password: str,
        topics: Sequence[str],
        *extra: str,
    ) -> None:
        # stdbuf: mosquitto_sub 2.0.11 block-buffers a pipe and lacks --unbuffered.
        command = ["stdbuf", "-oL", "mosquitto_sub", "-d", *_auth(broker, user, password)]
        command += ["-q", "1"]
        for topic in topics:
            command += ["-t", topic]
        command += ["-F", "MSG %t %p", *extra]
        self._proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _next_line(self, deadline: float) -> str | None:
        try:
            line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"mosquitto_sub said nothing in time: {self.output}") from None
        if line is not None:
            self.output.append(line)
        return line

    def wait_subscribed(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while True:
            line = self._next_line(deadline)
            if line is None:
                raise AssertionError(f"mosquitto_sub ended: {self.output}")
            if line.startswith("Subscribed"):
                return

    def messages_until(self, topic: str, payload: str) -> list[tuple[str, str]]:
        """Collect messages up to and including ``(topic, payload)``."""
        got: list[tuple[str, str]] = []
        deadline = time.monotonic() + WAIT_S
        while True:
            line = self._next_line(deadline)
            if line is None:
                raise AssertionError(f"mosquitto_sub ended: {self.output}")
            if line.startswith("MSG "):
                msg_topic, _, msg_payload = line[4:].partition(" ")
                got.append((msg_topic, msg_payload))
                if (msg_topic, msg_payload) == (topic, payload):
                    return got

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(timeout=WAIT_S)
        assert self._proc.stdout is not None
        self._proc.stdout.close()


@pytest.fixture
def gateway_sub(mosquitto: MosquittoServer) -> Iterator[Subscriber]:
    """The gateway service user subscribed to every device and fleet topic."""
    with Subscriber(mosquitto, GATEWAY_USER, GATEWAY_PASSWORD, ["devices/#", "fleet/#"]) as sub:
        sub.wait_subscribed()
        yield sub


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# --- mosquitto -------------------------------------------------------------------------


def test_mosquitto_starts_stops_and_restarts_on_its_port(make_mosquitto: MakeMosquitto) -> None:
    broker = make_mosquitto()
    port = broker.port
    assert broker.running
    assert broker.url == f"mqtt://127.0.0.1:{port}"
    assert _listening(port)
    conf = broker.conf_path.read_text()
    assert f"max_queued_messages {DEFAULT_MAX_QUEUED_MESSAGES}" in conf
    assert "autosave_interval 1\n" in conf
    assert "allow_anonymous false" in conf

    broker.stop()
    assert not broker.running
    assert not _listening(port)
    broker.stop()  # idempotent

    broker.restart()
    assert broker.port == port
    assert _listening(port)
    assert publish(broker, DEV1, device_pw(DEV1), f"devices/{DEV1}/telemetry", "x").returncode == 0


def test_mosquitto_kill_is_a_crash(make_mosquitto: MakeMosquitto) -> None:
    broker = make_mosquitto()
    broker.kill()
    assert not broker.running
    assert not _listening(broker.port)
    assert "terminating" not in broker.log_path.read_text()


def test_context_manager_stops_the_broker(tmp_path: Path) -> None:
    with MosquittoServer(tmp_path, users={GATEWAY_USER: GATEWAY_PASSWORD}) as broker:
        port = broker.port
        assert _listening(port)
    assert not broker.running
    assert not _listening(port)


def test_rendered_hashes_authenticate_and_wrong_passwords_do_not(
    mosquitto: MosquittoServer,
) -> None:
    topic = f"devices/{DEV1}/telemetry"
    assert publish(mosquitto, DEV1, device_pw(DEV1), topic, "ok").returncode == 0
    assert publish(mosquitto, GATEWAY_USER, GATEWAY_PASSWORD, "fleet/x", "ok").returncode == 0
    for user, password in [
        (DEV1, device_pw(DEV2)),  # another device's password
        (DEV1, "wrong"),
        (GATEWAY_USER, "wrong"),
        ("nobody", "whatever"),
    ]:
        done = publish(mosquitto, user, password, topic, "no")
        assert done.returncode != 0, (user, done)
        assert "not authorised" in done.stderr.lower()


def test_anonymous_clients_are_refused(mosquitto: MosquittoServer) -> None:
    done = subprocess.run(
        ["mosquitto_pub", "-h", mosquitto.host, "-p", str(mosquitto.port), "-t", "x", "-m", "1"],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )
    assert done.returncode != 0
    assert "not authorised" in done.stderr.lower()


def test_hash_format_matches_mosquitto_passwd(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "alice", "s3cret"], check=True)
    user, _, hashed = passwd.read_text().strip().partition(":")
    _, seven, iterations, salt_b64, _ = hashed.split("$")
    assert (user, seven, iterations) == ("alice", "7", "101")
    salt = base64.b64decode(salt_b64)
    assert hash_password("s3cret", salt=salt) == hashed
    assert hash_password("other", salt=salt) != hashed


def test_password_file_lines_are_user_and_hash() -> None:
    text = render_password_file({"b-user": "pw1", "a-user": "pw2"})
    lines = text.splitlines()
    assert [line.split(":")[0] for line in lines] == ["a-user", "b-user"]
    for line in lines:
        _, seven, iterations, salt, digest = line.split(":", 1)[1].split("$")
        assert (seven, iterations) == ("7", "101")
        assert len(base64.b64decode(salt)) == 12
        assert len(base64.b64decode(digest)) == 64


def test_device_publishes_only_under_its_own_id(
    mosquitto: MosquittoServer, gateway_sub: Subscriber
) -> None:
    pw = device_pw(DEV1)
    for channel in ("telemetry", "events", "status"):
        assert publish(mosquitto, DEV1, pw, f"devices/{DEV1}/{channel}", channel).returncode == 0
    # MQTT 3.1.1: the broker acks and drops; MQTT 5: it answers "not authorised".
    publish(mosquitto, DEV1, pw, f"devices/{DEV2}/telemetry", "forged")
    publish(mosquitto, DEV1, pw, f"devices/{DEV2}/telemetry", "forged5", "-V", "mqttv5")
    publish(mosquitto, DEV1, pw, f"devices/{DEV1}/commands", "self-command")
    publish(mosquitto, DEV1, pw, "fleet/diagnoses", "fake-diagnosis")
    publish(mosquitto, DEV1, pw, f"devices/{DEV1}/other", "unknown-channel")
    # Marker last: the broker forwards in order, so anything allowed earlier is in.
    assert publish(mosquitto, DEV1, pw, f"devices/{DEV1}/telemetry", "end").returncode == 0

    got = gateway_sub.messages_until(f"devices/{DEV1}/telemetry", "end")
    assert got == [
        (f"devices/{DEV1}/telemetry", "telemetry"),
        (f"devices/{DEV1}/events", "events"),
        (f"devices/{DEV1}/status", "status"),
        (f"devices/{DEV1}/telemetry", "end"),
    ]


def test_device_reads_only_its_own_commands(mosquitto: MosquittoServer) -> None:
    own = f"devices/{DEV1}/commands"
    other = f"devices/{DEV2}/commands"
    with Subscriber(mosquitto, DEV1, device_pw(DEV1), [own, other, "devices/#"]) as spy:
        spy.wait_subscribed()
        assert publish(mosquitto, GATEWAY_USER, GATEWAY_PASSWORD, other, "c-other").returncode == 0
        assert publish(mosquitto, GATEWAY_USER, GATEWAY_PASSWORD, own, "c-own").returncode == 0
        got = spy.messages_until(own, "c-own")
    assert got == [(own, "c-own")]


def test_service_users_cannot_publish_as_devices(
    mosquitto: MosquittoServer, gateway_sub: Subscriber
) -> None:
    forged = f"devices/{DEV1}/telemetry"
    publish(mosquitto, GATEWAY_USER, GATEWAY_PASSWORD, forged, "forged")
    assert publish(mosquitto, GATEWAY_USER, GATEWAY_PASSWORD, "fleet/cases", "end").returncode == 0
    assert gateway_sub.messages_until("fleet/cases", "end") == [("fleet/cases", "end")]


def test_shared_subscription_of_a_service_user_gets_device_telemetry(
    mosquitto: MosquittoServer,
) -> None:
    topic = f"devices/{DEV2}/telemetry"
    with Subscriber(
        mosquitto,
        GATEWAY_USER,
        GATEWAY_PASSWORD,
        ["$share/gateways/devices/+/telemetry"],
        "-V",
        "mqttv5",
    ) as sub:
        sub.wait_subscribed()
        assert publish(mosquitto, DEV2, device_pw(DEV2), topic, "shared").returncode == 0
        assert sub.messages_until(topic, "shared") == [(topic, "shared")]


def _queue_for_offline_gateway(broker: MosquittoServer, count: int) -> None:
    """Create the gateway's persistent session, go offline, let a device send ``count``."""
    session = ["-c", "-i", "gw-session", "-t", "devices/#", "-q", "1"]
    auth = _auth(broker, GATEWAY_USER, GATEWAY_PASSWORD)
    subprocess.run(
        ["mosquitto_sub", *auth, *session, "-E"], check=True, timeout=WAIT_S, capture_output=True
    )
    lines = "".join(f"{i}\n" for i in range(count))
    device = _auth(broker, DEV1, device_pw(DEV1))
    subprocess.run(
        ["mosquitto_pub", *device, "-q", "1", "-t", f"devices/{DEV1}/telemetry", "-l"],
        input=lines,
        text=True,
        check=True,
        timeout=WAIT_S * 2,
    )


def _drain_gateway_session(broker: MosquittoServer, expected: int) -> list[str]:
    """Reconnect the gateway's session and read for 1 s (more than ``expected`` shows)."""
    auth = _auth(broker, GATEWAY_USER, GATEWAY_PASSWORD)
    session = ["-c", "-i", "gw-session", "-t", "devices/#", "-q", "1"]
    done = subprocess.run(
        ["mosquitto_sub", *auth, *session, "-C", str(expected + 1), "-W", "1"],
        capture_output=True,
        text=True,
        timeout=WAIT_S * 2,
        check=False,
    )
    return done.stdout.split()


@pytest.mark.parametrize(
    ("max_queued", "expected"),
    [
        pytest.param(None, 1500, id="shipped-default-keeps-everything"),
        pytest.param(1000, 1000, id="mosquitto-default-drops"),
    ],
)
def test_offline_gateway_queue_survives_a_restart(
    make_mosquitto: MakeMosquitto, max_queued: int | None, expected: int
) -> None:
    options = {} if max_queued is None else {"max_queued_messages": max_queued}
    broker = make_mosquitto(**options)
    _queue_for_offline_gateway(broker, 1500)
    broker.restart()  # SIGTERM: mosquitto saves sessions and queues
    received = _drain_gateway_session(broker, expected)
    assert len(received) == expected
    assert received[:3] == ["0", "1", "2"]


def test_missing_mosquitto_binary_is_a_config_error(tmp_path: Path) -> None:
    server = MosquittoServer(tmp_path, binary="fixloop-no-such-mosquitto")
    with pytest.raises(ConfigError, match="apt-get install mosquitto"):
        server.start()
    assert not server.running


def test_mosquitto_that_cannot_start_reports_its_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = MosquittoServer(tmp_path, users={GATEWAY_USER: "pw"}, port=port)
        with pytest.raises(ConfigError, match="Address already in use") as info:
            server.start()
    assert "mosquitto exited" in str(info.value)
    assert not server.running


def test_device_ids_need_a_fleet_secret(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fleet_secret"):
        MosquittoServer(tmp_path, device_ids=[DEV1])


def test_a_user_name_cannot_be_both_device_and_service(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="used twice"):
        MosquittoServer(tmp_path, users={DEV1: "pw"}, device_ids=[DEV1], fleet_secret=FLEET_SECRET)


def test_device_ids_a_broker_cannot_handle_are_refused(tmp_path: Path) -> None:
    # ":" is fine in a device id but splits a mosquitto password-file line.
    with pytest.raises(ConfigError, match="password file"):
        MosquittoServer(tmp_path, device_ids=["dev:1"], fleet_secret=FLEET_SECRET)


# --- renderer checks -------------------------------------------------------------------


def _conf(*listeners: Listener, **kw: Any) -> str:
    return render_mosquitto_conf(
        listeners=listeners,
        data_dir="/d",
        password_file="/p",
        acl_file="/a",
        **kw,
    )


def test_tls_listener_rendering() -> None:
    conf = _conf(Listener(8883, "0.0.0.0", certfile="/c.crt", keyfile="/c.key", cafile="/ca"))
    assert "listener 8883 0.0.0.0\ncertfile /c.crt\nkeyfile /c.key\ncafile /ca\n" in conf


@pytest.mark.parametrize(
    "make",
    [
        lambda: Listener(0),
        lambda: Listener(8883, certfile="/c.crt"),
        lambda: Listener(8883, cafile="/ca"),
        lambda: _conf(),
        lambda: _conf(Listener(1883), Listener(1883)),
        lambda: _conf(Listener(1883), max_queued_messages=-1),
        lambda: _conf(Listener(1883), log_file="/x\nlistener 1"),
        lambda: render_acl(service_users=["a b"]),
        lambda: render_acl(service_users=["svc"], admin_users=["svc"]),
        lambda: render_password_file({"dev:1": "pw"}),
        lambda: render_password_file({"dev": ""}),
    ],
)
def test_renderer_refuses_what_mosquitto_would_misread(make: Callable[[], object]) -> None:
    with pytest.raises(ConfigError):
        make()


# --- influxd ---------------------------------------------------------------------------


def _ping(url: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=1.0) as response:
            return int(response.status)
    except OSError:
        return None


def _write(server: InfluxdServer, line: str) -> None:
    request = urllib.request.Request(
        f"{server.url}/write?db={server.database}", data=line.encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=5.0) as response:
        assert response.status == 204


def _values(server: InfluxdServer, q: str) -> list[list[object]]:
    answer = server.query(q, database=server.database)
    series = answer["results"][0].get("series", [])
    return series[0]["values"] if series else []


def test_session_influxd_answers_and_has_the_database(influxd: InfluxdServer) -> None:
    assert _ping(influxd.url) == 204
    names = influxd.query("SHOW DATABASES")["results"][0]["series"][0]["values"]
    assert ["fixloop"] in names


def test_influxd_keeps_data_across_restart_and_kill(make_influxd: MakeInfluxd) -> None:
    server = make_influxd()
    port = server.port
    _write(server, "probe,device=d1 value=1 1700000000000000000")
    server.stop()
    assert _ping(server.url) is None
    server.start()
    assert server.port == port
    _write(server, "probe,device=d1 value=2 1700000001000000000")
    server.kill()
    assert _ping(server.url) is None
    server.restart()
    assert _ping(server.url) == 204
    # Both points survive: the WAL is replayed after the SIGKILL.
    assert [row[1] for row in _values(server, "SELECT value FROM probe")] == [1, 2]


def test_influxd_rpc_port_is_not_the_default(make_influxd: MakeInfluxd) -> None:
    a = make_influxd()
    b = make_influxd()  # two servers at once: no clash on 8088
    assert a.port != b.port
    assert 'bind-address = "127.0.0.1:8088"' not in a.conf_path.read_text()
    assert _ping(a.url) == _ping(b.url) == 204


def test_influxd_with_auth_refuses_anonymous_queries(make_influxd: MakeInfluxd) -> None:
    server = make_influxd(username="admin", password="admin-pw")
    assert server.query("SHOW DATABASES")["results"]
    request = urllib.request.Request(f"{server.url}/query?q=SHOW%20DATABASES")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5.0)
    info.value.close()
    assert info.value.code == 401


def test_missing_influxd_binary_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="apt-get install influxdb"):
        InfluxdServer(tmp_path, binary=str(tmp_path / "no-influxd")).start()


def test_influxd_that_cannot_start_reports_its_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = InfluxdServer(tmp_path, port=taken.getsockname()[1])
        with pytest.raises(ConfigError, match="influxd exited") as info:
            server.start()
    assert "address already in use" in str(info.value).lower()


def test_clients_are_installed() -> None:
    # The ACL checks above rely on these; a missing one must fail, never skip.
    for name in ("mosquitto_pub", "mosquitto_sub", "mosquitto_passwd", "stdbuf"):
        assert shutil.which(name), name


def test_a_server_left_behind_by_a_killed_run_is_stopped_at_the_next_start(
    tmp_path: Path,
) -> None:
    first = MosquittoServer(tmp_path / "broker", port=free_port()).start()
    orphan = first._proc
    assert orphan is not None
    first._proc = None  # the run that started it was killed: nobody will stop it
    try:
        second = MosquittoServer(tmp_path / "broker", port=free_port()).start()
        try:
            assert orphan.wait(timeout=15) is not None
            assert second.running
            assert (tmp_path / "broker" / "mosquitto.pid").read_text().strip() == str(second.pid)
        finally:
            second.stop()
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def test_a_process_of_another_folder_is_left_alone(tmp_path: Path) -> None:
    other = MosquittoServer(tmp_path / "other", port=free_port()).start()
    try:
        (tmp_path / "broker").mkdir()
        (tmp_path / "broker" / "mosquitto.pid").write_text(f"{other.pid}\n")
        mine = MosquittoServer(tmp_path / "broker", port=free_port()).start()
        mine.stop()
        assert other.running
    finally:
        other.stop()
