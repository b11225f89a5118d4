"""Device-facing edge of fixloop: device protocol, MQTT ingest, InfluxDB writer, commands.

This package root re-exports the error tree only, on purpose. The simulated fleet
imports the device contract (``gateway.protocol``), and importing it runs this file
first: re-exporting the service here (``Gateway``, ``InfluxClient``, the metrics server)
would load aiohttp and the whole ingest path into every simulated device process and
double its import time. Import the service parts from their modules:
``gateway.service.Gateway``, ``gateway.settings.GatewaySettings`` and
``MqttSettings``, ``gateway.influx.InfluxClient`` and ``InfluxSettings``,
``gateway.spool.Spool``, ``gateway.commands.CommandChannel``,
``gateway.metrics.GatewayMetrics``.
"""

from gateway.errors import (
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
