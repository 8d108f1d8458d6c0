#!/bin/bash
# What the official postgres entrypoint does that the stack relies on: drop root, and on the first
# start create the cluster from POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB in PGDATA.
set -Eeuo pipefail
if [[ "${1:0:1}" == - ]]; then set -- postgres "$@"; fi
if [[ "$1" == postgres && "$(id -u)" == 0 ]]; then
  mkdir -p "$PGDATA" /var/run/postgresql
  chown -R postgres:postgres "$PGDATA" /var/run/postgresql
  chmod 700 "$PGDATA"
  exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi
if [[ "$1" == postgres && ! -s "$PGDATA/PG_VERSION" ]]; then
  user=${POSTGRES_USER:-postgres}
  db=${POSTGRES_DB:-$user}
  if [[ -z "${POSTGRES_PASSWORD:-}" ]]; then
    echo "error: the database is not initialised and POSTGRES_PASSWORD is not set" >&2
    exit 1
  fi
  initdb --username="$user" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") -D "$PGDATA" >/dev/null
  printf '\nhost all all all scram-sha-256\n' >> "$PGDATA/pg_hba.conf"
  # The wheel's clients look for the socket in /tmp, Debian's in /var/run/postgresql: serve both.
  printf "\nlisten_addresses = '*'\nunix_socket_directories = '/var/run/postgresql,/tmp'\n" >> "$PGDATA/postgresql.conf"
  pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
  if [[ "$db" != postgres ]]; then
    psql -v ON_ERROR_STOP=1 -h /var/run/postgresql -U "$user" -d postgres -c "CREATE DATABASE \"$db\";" >/dev/null
  fi
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  echo "PostgreSQL init process complete; ready for start up."
fi
exec "$@"
