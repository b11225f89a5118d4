"""Device-facing edge of fixloop: device protocol, MQTT ingest, InfluxDB writer, commands."""

__all__: list[str] = []
