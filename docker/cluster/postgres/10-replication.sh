#!/bin/bash
# The primary, at its first start only (docker-entrypoint-initdb.d): the role the
# standby streams the write-ahead log with, and the line that lets it connect for
# replication (the image's pg_hba.conf lets "all" databases in, which does not cover
# replication connections).
set -euo pipefail
psql -v ON_ERROR_STOP=1 -v password="${POSTGRES_REPLICATION_PASSWORD}" \
    --username "${POSTGRES_USER}" --dbname "${POSTGRES_DB}" <<'SQL'
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD :'password';
SQL
echo "host replication replicator all scram-sha-256" >> "${PGDATA}/pg_hba.conf"
