#!/bin/bash
# The standby: at its first start, a copy of the primary taken with pg_basebackup
# (-R writes the settings that make it a standby, -C -S a replication slot so the
# primary keeps the log the standby has not received yet); from then on it streams
# the primary's write-ahead log and answers reads (hot standby). Promote it with
# `docker compose -f docker/compose.cluster.yaml exec postgres-standby psql -U fixloop
# -c 'SELECT pg_promote()'` (docker/README.md, "Production on clustered engines").
# Arguments are passed on to postgres; PRIMARY_HOST and PRIMARY_PORT name the primary.
set -euo pipefail
primary_host="${PRIMARY_HOST:-postgres-primary}"
primary_port="${PRIMARY_PORT:-5432}"
if [ ! -s "${PGDATA}/PG_VERSION" ]; then
    until pg_isready -q -h "${primary_host}" -p "${primary_port}" -U "${POSTGRES_USER}"; do
        echo "waiting for ${primary_host}:${primary_port} ..."
        sleep 1
    done
    PGPASSWORD="${POSTGRES_REPLICATION_PASSWORD}" pg_basebackup \
        -h "${primary_host}" -p "${primary_port}" -U replicator --no-password \
        -D "${PGDATA}" -X stream -R -C -S standby1 --checkpoint=fast
    chmod 700 "${PGDATA}"
fi
# cluster_name is the name the primary knows it by (synchronous_standby_names)
exec postgres -D "${PGDATA}" -c hot_standby=on -c cluster_name=standby1 "$@"
