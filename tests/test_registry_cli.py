"""Onboarding commands (``fixloop products|devices|owners|technicians|tokens``) on a store.

The commands run through ``fixloop.cli.main`` as a user would run them, on the case store
of a data folder; what they stored is read back through the store, and claim codes they
printed are claimed with the key the notifier derives from the same fleet secret.
"""

from __future__ import annotations

import asyncio
import csv
import sqlite3
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fixloop.cli import main
from notifier.model import DeviceRecord, Owner
from notifier.registry import RegisteredDevice, claim_key
from notifier.sqlite import MIGRATIONS, SqliteStore

NOW = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in list(__import__("os").environ):
        if name.startswith("FIXLOOP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FIXLOOP_STACK__DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["--log-level", "WARNING", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _store(folder: Path, job: Any) -> Any:
    async def go() -> Any:
        async with SqliteStore(folder / "data" / "cases.sqlite3") as store:
            return await job(store)

    return asyncio.run(go())


def _key(folder: Path) -> bytes:
    return claim_key((folder / "data" / "fleet_secret").read_text().strip())


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_a_product_line_needs_a_product_file(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "products", "add", "dishwasher")
    assert code == 2
    assert "no product file describes 'dishwasher'" in err
    assert "fixloop products check" in err
    code, out, _ = run(capsys, "products", "add", "washer", "--name", "Aquaclean 7")
    assert code == 0
    assert "product line washer (Aquaclean 7) registered" in out
    code, out, _ = run(capsys, "products", "list")
    assert out.splitlines() == ["washer\tAquaclean 7\t0 devices"]


def test_import_reports_each_bad_row_and_fails(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "products", "add", "washer")[0] == 0
    devices = _write(
        folder / "devices.csv",
        "model,serial,region,firmware\n"
        "washer,W-1,north,2.3.1\n"
        "washer,W-2,,\n"
        "washer,W-1,south,\n"
        "fridge,F-1,north,\n"
        "washer,W 3,north,\n"
        "washer,W-4,north\n"
        "washer,W-5,north,2.3.1,extra\n",
    )
    code, out, err = run(capsys, "devices", "import", str(devices), "--labels", "labels.csv")
    assert code == 1
    assert out == ""
    lines = err.splitlines()
    assert f"{devices}:4: device_id: 'washer-W-1' is also line 2" in lines
    assert f"{devices}:4: serial: duplicate serial 'W-1' of washer: also line 2" in lines
    assert any(line.startswith(f"{devices}:5: model: unknown model 'fridge'") for line in lines)
    assert any(line.startswith(f"{devices}:6: serial: 'W 3' is not a serial") for line in lines)
    assert f"{devices}:8: has 5 values, the header names 4 columns" in lines
    assert "7 rows: 3 added, 4 failed" in err
    labels = folder / "labels.csv"
    assert stat.S_IMODE(labels.stat().st_mode) == 0o600
    with labels.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["device_id"] for r in rows] == ["washer-W-1", "washer-W-2", "washer-W-4"]

    async def check(store: SqliteStore) -> list[RegisteredDevice]:
        await store.put_owner(Owner("o-1", "Ana"))
        claimed = await store.registry().claim(
            "o-1", rows[1]["claim_code"], key=_key(folder), label=None, now=NOW
        )
        assert claimed.device.device_id == "washer-W-2"
        return await store.registry().list()

    listed = _store(folder, check)
    assert [(d.device_id, d.region, d.state) for d in listed] == [
        ("washer-W-1", "north", "unclaimed"),
        ("washer-W-2", "default", "claimed"),
        ("washer-W-4", "north", "unclaimed"),
    ]


def test_import_refuses_a_file_it_cannot_read(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "products", "add", "washer")[0] == 0
    code, _, err = run(capsys, "devices", "import", "missing.csv")
    assert (code, err.strip()) == (2, "fixloop: error: missing.csv: no such file")
    header = _write(folder / "header.csv", "model,serial,colour\nwasher,W-1,red\n")
    code, _, err = run(capsys, "devices", "import", str(header))
    assert code == 2
    assert "line 1: unknown column 'colour'" in err
    no_serial = _write(folder / "noserial.csv", "model,region\nwasher,north\n")
    code, _, err = run(capsys, "devices", "import", str(no_serial))
    assert code == 2
    assert "lacks the required column 'serial'" in err
    binary = folder / "binary.csv"
    binary.write_bytes(b"model,serial\nwasher,\xff\xfe\n")
    code, _, err = run(capsys, "devices", "import", str(binary))
    assert code == 2
    assert "not UTF-8" in err
    assert _store(folder, lambda store: store.registry().list()) == []


def test_a_large_import_goes_in_chunks_with_progress(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "products", "add", "fridge")[0] == 0
    lines = ["model;serial"] + [f"fridge;F-{n:05d}" for n in range(1_200)]
    lines.append("fridge;F-00007")  # the same serial as line 9, two chunks earlier
    big = _write(folder / "big.csv", "\n".join(lines) + "\n")
    code, out, err = run(capsys, "devices", "import", str(big), "--progress")
    assert code == 1
    assert "devices import: 500/1,201 rows, 0 failed" in err
    assert "devices import: 1,201/1,201 rows, 1 failed" in err
    assert f"{big}:1202: serial: duplicate serial 'F-00007' of fridge: also line 9" in err
    labels = list(csv.DictReader(out.splitlines()))
    assert len(labels) == 1_200
    assert len({row["claim_code"] for row in labels}) == 1_200


def test_add_list_retire(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "products", "add", "washer")[0] == 0
    code, _, err = run(capsys, "devices", "add", "--model", "fridge", "--serial", "F-1")
    assert code == 1
    assert "--model: unknown model 'fridge'" in err
    code, out, err = run(
        capsys, "devices", "add", "--model", "washer", "--serial", "W-9", "--region", "west"
    )
    assert code == 0
    device_id, said = out.strip().split("\t")
    assert device_id == "washer-W-9"
    assert said.startswith("claim code ")
    assert "shown only now" in err
    code, _, err = run(
        capsys, "devices", "add", "--model", "washer", "--serial", "W-9", "--device-id", "w9b"
    )
    assert code == 1
    assert "--serial: duplicate serial 'W-9'" in err
    code, out, _ = run(capsys, "devices", "list", "--json")
    assert '"state": "unclaimed"' in out
    assert '"region": "west"' in out
    assert run(capsys, "devices", "retire", "washer-W-9")[0] == 0
    code, out, _ = run(capsys, "devices", "list", "--state", "retired")
    assert out.split("\t")[0] == "washer-W-9"
    code, _, err = run(capsys, "devices", "retire", "washer-W-9")
    assert (code, "retired already" in err) == (2, True)
    code, _, err = run(capsys, "devices", "retire", "nope")
    assert (code, "no registered device nope" in err) == (2, True)


def test_owners_technicians_and_tokens(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "owners", "invite", "--name", "Ana Lima", "--timezone", "Mars/Base")
    assert code == 2
    code, out, err = run(
        capsys, "owners", "invite", "--name", "Ana Lima", "--language", "pt", "--token"
    )
    assert code == 0
    said = dict(line.split("\t", 1) for line in out.splitlines())
    assert "/api/v1/invites/accept" in err

    code, out, err = run(
        capsys,
        "technicians",
        "add",
        "--name",
        "Tom",
        "--region",
        "north",
        "--skills",
        "bearing, drain_pump",
        "--hours",
        "mon-fri 08:00-17:00, sat 09:00-12:00",
        "--id",
        "t-tom",
    )
    assert code == 0
    tech_token = dict(line.split("\t", 1) for line in out.splitlines())["token"]
    code, _, err = run(
        capsys,
        "technicians",
        "add",
        "--name",
        "X",
        "--region",
        "n",
        "--skills",
        "a",
        "--hours",
        "someday",
    )
    assert (code, "--hours" in err) == (2, True)

    code, out, err = run(capsys, "tokens", "issue", "--role", "ops", "--id", "olga")
    assert code == 0
    ops_token = out.strip()
    token_id = err.split("id ")[1].split(" ")[0]
    code, _, err = run(capsys, "tokens", "issue", "--role", "owner", "--id", "nobody")
    assert (code, "no owner nobody" in err) == (2, True)

    async def who(store: SqliteStore) -> list[Any]:
        owner = await store.get_owner(said["owner"])
        tech = await store.get_technician("t-tom")
        owner_id = await store.registry().use_invite(said["invite"], now=datetime.now(UTC))
        return [
            owner,
            tech,
            owner_id,
            await store.resolve_token(said["token"]),
            await store.resolve_token(tech_token),
            await store.resolve_token(ops_token),
        ]

    owner, tech, invited, owner_p, tech_p, ops_p = _store(folder, who)
    assert (owner.name, owner.language) == ("Ana Lima", "pt")
    assert invited == owner.owner_id
    assert tech.skills == frozenset({"bearing", "drain_pump"})
    assert len(tech.hours) == 6
    assert (owner_p, tech_p, ops_p) == (
        ("owner", owner.owner_id),
        ("technician", "t-tom"),
        ("ops", "olga"),
    )

    assert run(capsys, "tokens", "revoke", token_id)[0] == 0
    code, _, err = run(capsys, "tokens", "revoke", token_id)
    assert (code, f"no token {token_id}" in err) == (2, True)
    code, out, _ = run(capsys, "tokens", "revoke", "--all-of", "technician:t-tom")
    assert (code, out.strip()) == (0, "1 tokens of technician t-tom revoked")
    gone = _store(
        folder,
        lambda store: asyncio.gather(
            store.resolve_token(ops_token), store.resolve_token(tech_token)
        ),
    )
    assert gone == [None, None]


def test_an_older_store_registers_the_devices_it_knew(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version (version) VALUES (4)")
        for step in MIGRATIONS[:4]:
            for statement in step:
                conn.execute(statement)

    async def seed_and_open() -> tuple[list[RegisteredDevice], list[str]]:
        # rows written by the code of version 4, before the registry existed
        with sqlite3.connect(path) as conn:
            conn.execute(
                "INSERT INTO owners VALUES ('o-1', 'Ana', 'en', 'UTC', 'north', "
                "'fix_and_tell', NULL, NULL, '[]', '[]', 3)"
            )
            conn.execute(
                "INSERT INTO devices VALUES ('wm-1', 'o-1', 'washer', '2.3.1', 'cellar', 'B1')"
            )
        async with SqliteStore(path) as store:
            await store.put_device(DeviceRecord("fr-1", "o-1", "fridge"))
            registry = store.registry()
            return await registry.list(), [x.model for x in await registry.product_lines()]

    devices, lines = asyncio.run(seed_and_open())
    assert lines == ["washer"]
    (device,) = devices
    assert (device.device_id, device.serial, device.region, device.firmware, device.batch) == (
        "wm-1",
        "wm-1",
        "north",
        "2.3.1",
        "B1",
    )
    assert device.state == "claimed"
    assert not device.claimable
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == len(MIGRATIONS)


def test_owners_link_subject_of_the_identity_provider(
    folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = run(capsys, "owners", "invite", "--name", "Ana")
    owner = dict(line.split("\t", 1) for line in out.splitlines())["owner"]
    # no provider configured: the issuer must be named
    code, _, err = run(capsys, "owners", "link-subject", owner, "user-1")
    assert (code, "--issuer" in err) == (2, True)
    idp = "https://login.example.com/realms/acme"
    monkeypatch.setenv("FIXLOOP_NOTIFIER__OIDC__ISSUER", idp)
    monkeypatch.setenv("FIXLOOP_NOTIFIER__OIDC__AUDIENCE", "https://api.example.com")
    code, out, _ = run(capsys, "owners", "link-subject", owner, "user-1")
    assert (code, out.strip()) == (0, f"user-1 of {idp} linked to owner {owner}")
    other = "https://other.example.com"
    assert run(capsys, "owners", "link-subject", owner, "u-9", "--issuer", other)[0] == 0
    code, out, _ = run(capsys, "owners", "subjects", owner)
    assert out.splitlines() == [f"{idp}\tuser-1", f"{other}\tu-9"]
    _, out, _ = run(capsys, "owners", "invite", "--name", "Ben")
    ben = dict(line.split("\t", 1) for line in out.splitlines())["owner"]
    code, _, err = run(capsys, "owners", "link-subject", ben, "user-1")
    assert (code, "another owner" in err) == (2, True)
    code, _, err = run(capsys, "owners", "link-subject", "o-nobody", "user-2")
    assert (code, "no owner o-nobody" in err) == (2, True)
    code, _, err = run(capsys, "owners", "unlink-subject", ben, "user-1")
    assert (code, "is not linked" in err) == (1, True)
    assert run(capsys, "owners", "unlink-subject", owner, "user-1")[0] == 0

    async def links(store: SqliteStore) -> Any:
        return (
            await store.owner_of_subject(idp, "user-1"),
            await store.owner_of_subject(other, "u-9"),
        )

    assert _store(folder, links) == (None, owner)
