"""Device authentication on a real mosquitto: per-device passwords and X.509 certificates.

The tests make their own CA (and a second, foreign one) with ``cryptography`` and start a
broker with a TLS listener that requires a client certificate and takes its common name
as the user name (``use_identity_as_username``), so the ACL's ``%u`` patterns pin a
device to the id in its certificate.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from conftest import DEVICE_IDS, FLEET_SECRET, GATEWAY_PASSWORD, device_pw
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from test_device_e2e import WATCHER, WATCHER_PASSWORD, Watcher, device_settings, wait_until

from device import Device, DeviceSettings, TlsSettings
from fixloop.broker import GATEWAY_USER
from fixloop.server import free_port
from fixloop.stack import MosquittoServer
from wire.protocol import decode_reading

pytestmark = pytest.mark.integration


# -- a test PKI ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


class Authority:
    """A certificate authority made for the test (EC P-256, valid for a day)."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.name = subject
        self.cert = (
            self._builder(subject, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = root / "ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: x509.Name, public_key: Any) -> x509.CertificateBuilder:
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(getattr(self, "name", subject))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
        )

    def issue(self, common_name: str, *, server: bool = False) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            self._builder(subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        issued = Issued(self.root / f"{common_name}.pem", self.root / f"{common_name}.key")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        issued.key.chmod(0o600)
        return issued


class CertificateMosquitto(MosquittoServer):
    """The fixloop broker plus a TLS listener that logs devices in by certificate."""

    def __init__(self, root: Path, ca: Authority, server: Issued, **kw: Any) -> None:
        super().__init__(root, **kw)
        self.tls_port = free_port()
        self.ca = ca
        self.server = server

    def _prepare(self) -> None:
        super()._prepare()
        listener = (
            "\n# Devices log in with a client certificate: its CN is the user name.\n"
            f"listener {self.tls_port} {self.host}\n"
            f"certfile {self.server.cert}\n"
            f"keyfile {self.server.key}\n"
            f"cafile {self.ca.ca_file}\n"
            "require_certificate true\n"
            "use_identity_as_username true\n"
            "tls_version tlsv1.2\n"  # the lowest version taken
        )
        with self.conf_path.open("a", encoding="utf-8") as conf:
            conf.write(listener)


@dataclass
class Pki:
    ca: Authority
    foreign: Authority
    broker: CertificateMosquitto


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[Pki]:
    ca = Authority(tmp_path / "ca", "fixloop test device CA")
    foreign = Authority(tmp_path / "foreign", "someone else's CA")
    broker = CertificateMosquitto(
        tmp_path / "broker",
        ca,
        ca.issue("broker", server=True),
        users={GATEWAY_USER: GATEWAY_PASSWORD, WATCHER: WATCHER_PASSWORD},
        device_ids=DEVICE_IDS,
        fleet_secret=FLEET_SECRET,
    )
    broker.start()
    try:
        yield Pki(ca, foreign, broker)
    finally:
        broker.stop()


def cert_settings(
    pki: Pki, device_id: str, data_dir: Path, issued: Issued, **kw: Any
) -> DeviceSettings:
    tls = TlsSettings(ca_file=pki.ca.ca_file, cert_file=issued.cert, key_file=issued.key)
    values: dict[str, Any] = {
        "port": pki.broker.tls_port,
        "tls": tls,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.5,
    }
    values.update(kw)
    return DeviceSettings(device_id, pki.broker.host, data_dir, **values)


def raw_publish(pki: Pki, issued: Issued, topic: str) -> ReasonCode:
    """Publish at QoS 1 with a certificate; return the broker's PUBACK reason code."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="raw", protocol=paho.MQTTv5)
    client.tls_set(ca_certs=str(pki.ca.ca_file), certfile=str(issued.cert), keyfile=str(issued.key))
    codes: list[ReasonCode] = []
    client.on_publish = lambda c, u, mid, rc, p: codes.append(rc)
    client.connect(pki.broker.host, pki.broker.tls_port)
    client.loop_start()
    try:
        client.publish(topic, b'{"v":1}', qos=1)
        wait_until(lambda: codes, 10, "the PUBACK")
    finally:
        client.disconnect()
        client.loop_stop()
    return codes[0]


# -- certificates ------------------------------------------------------------------------------


def test_a_device_logs_in_as_the_common_name_of_its_certificate(pki: Pki, tmp_path: Path) -> None:
    device_id = DEVICE_IDS[0]
    watcher = Watcher(pki.broker)
    dev = Device(cert_settings(pki, device_id, tmp_path / "d", pki.ca.issue(device_id)))
    try:
        dev.start()
        assert dev.wait_connected(10)
        seq = dev.publish_reading({"temp_c": 21.5})
        assert dev.flush(10)
        telemetry = f"devices/{device_id}/telemetry"
        wait_until(lambda: watcher.on(telemetry), 10, "the reading")
    finally:
        dev.stop()
        watcher.close()
    [payload] = watcher.on(telemetry)
    reading = decode_reading(device_id, payload, int(time.time() * 1000))
    assert (reading.seq, dict(reading.metrics)) == (seq, {"temp_c": 21.5})
    assert watcher.on(f"devices/{device_id}/status") == [b"online", b"offline"]
    assert dev.settings.password is None  # no password anywhere


def test_a_certificate_cannot_publish_as_another_device(pki: Pki, tmp_path: Path) -> None:
    mine, other = DEVICE_IDS[0], DEVICE_IDS[1]
    issued = pki.ca.issue(mine)
    assert raw_publish(pki, issued, f"devices/{other}/telemetry").getName() == "Not authorized"
    assert raw_publish(pki, issued, f"devices/{mine}/telemetry").is_failure is False
    # the library configured with another id: the broker refuses each message, and says so
    watcher = Watcher(pki.broker)
    dev = Device(cert_settings(pki, other, tmp_path / "d", issued))
    try:
        dev.start()
        assert dev.wait_connected(10)
        dev.publish_reading({"temp_c": 99.0})
        wait_until(lambda: dev.stats().refused >= 2, 10, "the refusals")  # boot and reading
        stats = dev.stats()
    finally:
        dev.stop()
        watcher.close()
    assert (stats.buffered, stats.published) == (0, 0)
    assert [s.topic for s in watcher.seen if s.topic.startswith(f"devices/{other}/")] == []


def test_a_certificate_from_another_ca_is_refused(pki: Pki, tmp_path: Path) -> None:
    foreign = pki.foreign.issue(DEVICE_IDS[0])
    dev = Device(cert_settings(pki, DEVICE_IDS[0], tmp_path / "d", foreign))
    try:
        dev.start()
        wait_until(lambda: dev.stats().last_error, 10, "the refusal")
        error = str(dev.stats().last_error)
        connected = dev.connected
    finally:
        dev.stop()
    assert not connected
    assert "connection closed before it was accepted" in error  # the TLS handshake failed
    assert "certificate verify failed" in pki.broker.log_tail()  # the broker's reason


def test_a_device_without_a_certificate_is_refused(pki: Pki, tmp_path: Path) -> None:
    settings = DeviceSettings(
        DEVICE_IDS[0],
        pki.broker.host,
        tmp_path / "d",
        port=pki.broker.tls_port,
        tls=TlsSettings(ca_file=pki.ca.ca_file),
        password="guessed",
        reconnect_min_s=0.05,
    )
    dev = Device(settings)
    try:
        dev.start()
        wait_until(lambda: dev.stats().last_error, 10, "the refusal")
        assert not dev.connected
    finally:
        dev.stop()
    assert "peer did not return a certificate" in pki.broker.log_tail()  # a password is no key


def test_the_device_refuses_a_broker_its_ca_did_not_sign(pki: Pki, tmp_path: Path) -> None:
    issued = pki.ca.issue(DEVICE_IDS[0])
    settings = cert_settings(
        pki,
        DEVICE_IDS[0],
        tmp_path / "d",
        issued,
        tls=TlsSettings(ca_file=pki.foreign.ca_file, cert_file=issued.cert, key_file=issued.key),
    )
    dev = Device(settings)
    try:
        dev.start()
        wait_until(lambda: dev.stats().last_error, 10, "the refusal")
        error = str(dev.stats().last_error)
        assert not dev.connected
    finally:
        dev.stop()
    assert "certificate verify failed" in error


# -- passwords -------------------------------------------------------------------------------


def test_passwords_pin_a_device_to_its_own_id(pki: Pki, tmp_path: Path) -> None:
    """Today's scheme on the plain listener: each device its own derived password."""
    broker = pki.broker
    mine, other = DEVICE_IDS[0], DEVICE_IDS[1]
    wrong = Device(device_settings(broker, mine, tmp_path / "w", password="not-the-password"))
    try:
        wrong.start()
        wait_until(lambda: wrong.stats().last_error, 10, "the refusal")
        assert "refused the connection" in str(wrong.stats().last_error)
        assert not wrong.connected
    finally:
        wrong.stop()
    # another device's password under this id: the broker user is the other device
    borrowed = Device(
        device_settings(broker, other, tmp_path / "b", username=mine, password=device_pw(mine))
    )
    try:
        borrowed.start()
        assert borrowed.wait_connected(10)
        wait_until(lambda: borrowed.stats().refused >= 1, 10, "the refusal of the boot event")
    finally:
        borrowed.stop()
    right = Device(device_settings(broker, mine, tmp_path / "r"))
    try:
        right.start()
        assert right.wait_connected(10)
        assert right.flush(10)
        assert right.stats().refused == 0
    finally:
        right.stop()
