#!/bin/sh
# Runs once, when the Postgres volume is first initialised: POSTGRES_DB (prefect) exists already; add mlflow.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE DATABASE mlflow;
SQL
