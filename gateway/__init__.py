"""The gateway stage: MQTT ingest -> validation -> InfluxDB, with a durable spool.

Import the parts from their modules: ``gateway.service.Gateway``,
``gateway.settings.GatewaySettings``, ``gateway.spool.Spool``,
``gateway.metrics.GatewayMetrics``. What the other stages share with it (device
protocol, MQTT client, InfluxDB client, error tree) lives in ``wire``. Nothing is
re-exported here so that reading fixloop's settings does not load the service.
"""

__all__: list[str] = []
