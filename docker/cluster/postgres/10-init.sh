#!/bin/bash
# The primary, at its first start only (docker-entrypoint-initdb.d): the role the
# standby streams the write-ahead log with, and the line that lets it connect for
# replication (the image's pg_hba.conf lets "all" databases in, which does not cover
# replication connections); and the database of the diagnostics partitions' leases and
# checkpoints (diagnostics.lease_url), apart from the case store's, which holds only
# its own tables. The standby copies both.
set -euo pipefail
psql -v ON_ERROR_STOP=1 -v password="${POSTGRES_REPLICATION_PASSWORD}" \
    -v owner="${POSTGRES_USER}" \
    --username "${POSTGRES_USER}" --dbname "${POSTGRES_DB}" <<'SQL'
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD :'password';
CREATE DATABASE fixloop_partitions OWNER :"owner";
SQL
echo "host replication replicator all scram-sha-256" >> "${PGDATA}/pg_hba.conf"
