"""InfluxClient against a real influxd (1.x) on a free loopback port.

A small local HTTP receiver stands in only where no real server can show the behaviour
here: the v2 request shape (no InfluxDB 2/3 binary is installed), 5xx/401/413 answers and
a server that never answers.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import itertools
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from conftest import MakeInfluxd
from pydantic import SecretStr
from yarl import URL

from fixloop.server import free_port
from fixloop.stack import InfluxdServer
from wire.errors import PermanentError, StoreUnavailableError
from wire.influx import InfluxClient, InfluxSettings, WriteOutcome
from wire.lineproto import reading_to_line
from wire.protocol import Reading

T0 = 1_700_000_000_000
_DB_NUMBERS = itertools.count()


@pytest.fixture
def influx_server(influxd: InfluxdServer) -> InfluxdServer:
    """The session's influxd (each test writes to a database of its own)."""
    return influxd


@pytest.fixture
async def client(influx_server: InfluxdServer) -> AsyncIterator[InfluxClient]:
    settings = InfluxSettings(
        url=influx_server.url, database=f"test{next(_DB_NUMBERS)}", timeout_s=5
    )
    async with InfluxClient(settings) as influx:
        await influx.ensure_database()
        yield influx


def line(device: str, seq: int, value: str = "20.5") -> bytes:
    return f"telemetry,device={device} temp={value},seq={seq}i {T0 + seq}".encode()


async def test_write_then_count_and_query(client: InfluxClient) -> None:
    assert await client.ping()
    assert await client.count("telemetry") == 0
    outcome = await client.write([line("d1", i) for i in range(50)])
    assert outcome == WriteOutcome(50, [])
    assert await client.count("telemetry") == 50
    assert await client.count("telemetry", where="device = 'd1' AND seq >= 40") == 10
    series = await client.query("SELECT temp, seq FROM telemetry WHERE seq < 2 ORDER BY time")
    assert len(series) == 1
    assert series[0].name == "telemetry"
    assert series[0].columns == ("time", "temp", "seq")
    assert series[0].values == [[T0, 20.5, 0], [T0 + 1, 20.5, 1]]
    grouped = await client.query("SELECT COUNT(seq) FROM telemetry GROUP BY device", epoch="s")
    assert [(s.tags, s.values[0][1]) for s in grouped] == [({"device": "d1"}, 50)]


async def test_rewrite_is_idempotent(client: InfluxClient) -> None:
    lines = [line(f"d{i % 3}", i) for i in range(30)]
    assert (await client.write(lines)).written == 30
    assert (await client.write(lines)).written == 30
    assert (await client.write(lines[5:9])).written == 4
    assert await client.count("telemetry") == 30


async def test_bad_points_are_set_aside_and_the_rest_written(
    client: InfluxClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = [line("d1", i) for i in range(64)]
    bad = {5: 'temp="hot"', 23: 'temp="cold"', 60: "temp=notanumber"}
    for index, field in bad.items():
        lines[index] = f"telemetry,device=d1 {field},seq={index}i {T0 + index}".encode()
    posts = 0
    post = client._post_lines

    async def counting(chunk: list[bytes], url: URL) -> str | None:
        nonlocal posts
        posts += 1
        return await post(chunk, url)

    monkeypatch.setattr(client, "_post_lines", counting)
    outcome = await client.write(lines)
    assert outcome.written == 61
    assert [rejected for rejected, _ in outcome.rejected] == [lines[i] for i in sorted(bad)]
    errors = [error for _, error in outcome.rejected]
    assert "field type conflict" in errors[0]
    assert "field type conflict" in errors[1]
    assert "unable to parse" in errors[2]
    assert all(error.startswith("HTTP 400: ") for error in errors)
    assert posts <= 1 + 2 * len(bad) * 6  # O(bad * log n), not one request per line
    assert await client.count("telemetry") == 61
    stored = await client.query("SELECT seq FROM telemetry")
    assert sorted(row[1] for row in stored[0].values) == sorted(set(range(64)) - set(bad))


async def test_hostile_tags_stay_one_point_each(client: InfluxClient) -> None:
    hostile = [
        "evil\ntelemetry,device=x temp=99,seq=1i 1",
        "carriage\rreturn",
        "a b,c=d",
        'quote"s, \\ and back\\slash',
        "tab\there",
        "ünïcødé ☃",
        "x temp=1",
    ]
    readings = [Reading(d, i, T0 + i, {"temp": 1.0}, "a b") for i, d in enumerate(hostile)]
    outcome = await client.write([reading_to_line(r) for r in readings])
    assert outcome == WriteOutcome(len(hostile), [])
    assert await client.count("telemetry") == len(hostile)
    assert await client.count("telemetry", where="device = 'x'") == 0
    series = await client.query("SELECT seq, device, status FROM telemetry ORDER BY time")
    stored = {row[2]: (row[1], row[3]) for row in series[0].values}
    assert len(stored) == len(hostile)
    for i, device in enumerate(hostile):
        # InfluxDB 1.x keeps the escapes "\\", "\n" and "\r" of tags as two characters.
        expected = device.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        assert stored[expected] == (i, "a b")


async def test_query_errors_are_permanent(client: InfluxClient) -> None:
    with pytest.raises(PermanentError, match="refused the query"):
        await client.query("SELEKT nonsense")
    with pytest.raises(PermanentError, match="undefined function"):
        await client.query("SELECT temp FROM telemetry; SELECT nosuchfn(temp) FROM telemetry")


async def test_query_on_missing_database_is_permanent(influx_server: InfluxdServer) -> None:
    settings = InfluxSettings(url=influx_server.url, database="nowhere")
    async with InfluxClient(settings) as influx:
        with pytest.raises(PermanentError, match="database not found"):
            await influx.query("SELECT * FROM telemetry")


async def test_missing_database_is_unavailable(influx_server: InfluxdServer) -> None:
    settings = InfluxSettings(url=influx_server.url, database="never_created")
    async with InfluxClient(settings) as influx:
        with pytest.raises(StoreUnavailableError, match="HTTP 404"):
            await influx.write([line("d1", 1)])


async def test_gzip_writes(influx_server: InfluxdServer) -> None:
    settings = InfluxSettings(url=influx_server.url, database="gzipped", gzip=True)
    async with InfluxClient(settings) as influx:
        await influx.ensure_database()
        # large enough to be compressed in a worker thread
        assert (await influx.write([line("d1", i) for i in range(3000)])).written == 3000
        assert await influx.count("telemetry") == 3000


async def test_stopped_influxd_is_unavailable(make_influxd: MakeInfluxd) -> None:
    server = make_influxd()
    settings = InfluxSettings(url=server.url, database="gone", timeout_s=2)
    try:
        async with InfluxClient(settings) as influx:
            await influx.ensure_database()
            assert (await influx.write([line("d1", 1)])).written == 1
            server.stop()
            assert not await influx.ping()
            with pytest.raises(StoreUnavailableError, match="unreachable") as caught:
                await influx.write([line("d1", 2)])
            assert isinstance(caught.value.__cause__, aiohttp.ClientError | OSError)
            with pytest.raises(StoreUnavailableError):
                await influx.count("telemetry")
    finally:
        server.stop()


async def test_silent_server_times_out() -> None:
    with socket.socket() as listener:  # accepts connections (backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        settings = InfluxSettings(url=f"http://127.0.0.1:{port}", timeout_s=0.3)
        async with InfluxClient(settings) as influx:
            with pytest.raises(StoreUnavailableError, match="did not answer") as caught:
                await influx.write([line("d1", 1)])
            assert isinstance(caught.value.__cause__, TimeoutError)


async def test_client_must_be_opened() -> None:
    influx = InfluxClient(InfluxSettings(url=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(StoreUnavailableError, match="not open"):
        await influx.write([line("d1", 1)])


def test_settings_are_frozen_and_checked() -> None:
    settings = InfluxSettings()
    assert settings.url == "http://127.0.0.1:8086"
    assert settings.flavor == "v1"
    assert settings.database == "fixloop"
    with pytest.raises(ValueError, match="frozen"):
        settings.database = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="http"):
        InfluxSettings(url="ftp://example.invalid")
    with pytest.raises(ValueError, match="greater than 0"):
        InfluxSettings(timeout_s=0)
    assert "hunter2" not in repr(InfluxSettings(token=SecretStr("hunter2")))


# --- a local receiver for what influxd 1.6 cannot show ---------------------------------


class Receiver:
    """Records requests and answers with a status chosen per request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], dict[str, str], bytes]] = []
        self.status = 204
        self.max_body = 1 << 30
        self.hold = False  # keep requests waiting until `release` is set
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.hold:
            await self.release.wait()
        self.requests.append(
            (request.method, request.path, dict(request.query), dict(request.headers), body)
        )
        if len(body) > self.max_body:
            return web.json_response({"error": "request entity too large"}, status=413)
        if self.status == 200:
            return web.json_response({"results": [{"statement_id": 0}]})
        if self.status == 204:
            return web.Response(status=204)
        return web.json_response(
            {"code": "x", "message": f"status {self.status}"}, status=self.status
        )


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    fake = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield fake, f"http://127.0.0.1:{port}/influx"
    finally:
        fake.release.set()
        await runner.cleanup()


async def test_v2_request_shape(receiver: tuple[Receiver, str]) -> None:
    fake, url = receiver
    settings = InfluxSettings(
        url=url, flavor="v2", org="acme", bucket="telemetry", token=SecretStr("s3cret"), gzip=True
    )
    async with InfluxClient(settings) as influx:
        assert (await influx.write([line("d1", 1), line("d1", 2)])).written == 2
        await influx.ensure_database()  # a no-op for v2
        fake.status = 200
        assert await influx.query("SELECT * FROM telemetry") == []
    (method, path, query, headers, body), query_request = fake.requests
    assert (method, path) == ("POST", "/influx/api/v2/write")
    assert query == {"org": "acme", "bucket": "telemetry", "precision": "ms"}
    assert headers["Authorization"] == "Token s3cret"
    assert headers["Content-Encoding"] == "gzip"
    plain = line("d1", 1) + b"\n" + line("d1", 2)
    assert body == plain  # aiohttp's server has already inflated it
    assert int(headers["Content-Length"]) == len(gzip.compress(plain, 6))
    assert query_request[1] == "/influx/query"
    assert query_request[3]["Authorization"] == "Token s3cret"
    assert b"db=telemetry" in query_request[4]


async def test_v1_basic_auth_and_retention_policy(receiver: tuple[Receiver, str]) -> None:
    fake, url = receiver
    settings = InfluxSettings(
        url=url, database="db1", retention_policy="week", username="u", password=SecretStr("p")
    )
    async with InfluxClient(settings) as influx:
        await influx.write([line("d1", 1)])
    _, path, query, headers, _ = fake.requests[0]
    assert path == "/influx/write"
    assert query == {"db": "db1", "rp": "week", "precision": "ms"}
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"u:p").decode()


@pytest.mark.parametrize("status", [401, 403, 500, 503])
async def test_unavailable_statuses_hold_the_batch(
    receiver: tuple[Receiver, str], status: int
) -> None:
    fake, url = receiver
    fake.status = status
    async with InfluxClient(InfluxSettings(url=url)) as influx:
        with pytest.raises(StoreUnavailableError, match=f"HTTP {status}: status {status}"):
            await influx.write([line("d1", i) for i in range(8)])
        with pytest.raises(StoreUnavailableError):
            await influx.query("SELECT 1")
    assert len(fake.requests) == 2  # no splitting on these


async def test_too_large_bodies_are_split(receiver: tuple[Receiver, str]) -> None:
    fake, url = receiver
    lines = [line("d1", i) for i in range(16)]
    fake.max_body = 4 * len(lines[0]) + 10
    async with InfluxClient(InfluxSettings(url=url)) as influx:
        outcome = await influx.write([*lines, b"x" * 1000])
    assert outcome.written == 16
    assert outcome.rejected == [(b"x" * 1000, "HTTP 413: request entity too large")]
    written = b"\n".join(r[4] for r in fake.requests if len(r[4]) <= fake.max_body)
    assert written.split(b"\n") == lines


async def test_cancellation_is_not_swallowed(receiver: tuple[Receiver, str]) -> None:
    fake, url = receiver
    fake.hold = True
    async with InfluxClient(InfluxSettings(url=url)) as influx:
        task = asyncio.create_task(influx.write([line("d1", 1)]))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
