"""What every stage of fixloop shares (the wire between them).

The device protocol (``wire.protocol``: topics, typed messages, codec, device
credentials), fixloop's own MQTT 5 client (``wire.mqtt``) and its settings
(``wire.settings.MqttSettings``), the reconnecting consumer (``wire.consumer``),
the error tree (``wire.errors``), the command downlink (``wire.commands``), the
InfluxDB client and InfluxQL quoting (``wire.influx``), line protocol (``wire.lineproto``)
and the stage supervisor (``wire.supervisor``).

This package root re-exports the error tree only, on purpose. The simulated fleet
imports the device contract (``wire.protocol``), and importing it runs this file
first: re-exporting the InfluxDB client or the MQTT client here would load aiohttp
into every simulated device process and double its import time.
"""

from wire.errors import (
    BrokerUnavailableError,
    ConfigError,
    FixloopError,
    PermanentError,
    RejectedError,
    StoreUnavailableError,
    TransientError,
    WriteRejectedError,
)

__all__ = [
    "BrokerUnavailableError",
    "ConfigError",
    "FixloopError",
    "PermanentError",
    "RejectedError",
    "StoreUnavailableError",
    "TransientError",
    "WriteRejectedError",
]
