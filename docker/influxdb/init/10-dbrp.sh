#!/bin/bash
# Runs once, after the first-start setup: map the bucket to a v1 database and retention
# policy so fixloop's InfluxQL reads (the v1-compatible /query) find the bucket.
set -euo pipefail
influx v1 dbrp create \
    --org "${DOCKER_INFLUXDB_INIT_ORG}" \
    --bucket-id "${DOCKER_INFLUXDB_INIT_BUCKET_ID}" \
    --db "${DOCKER_INFLUXDB_INIT_BUCKET}" \
    --rp autogen \
    --default
