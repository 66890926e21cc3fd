#!/usr/bin/env bash
# Runs once, when Postgres starts on an empty volume: MLflow's database beside Prefect's
# (POSTGRES_DB). Both belong to POSTGRES_USER.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" -c "CREATE DATABASE mlflow"
