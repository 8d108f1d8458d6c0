#!/usr/bin/env bash
# Refuse to start the stack while .env is missing or still holds a placeholder secret.
# Usage: infra/check-env.sh [path/to/.env]
set -euo pipefail
env_file=${1:-.env}
if [[ ! -f "$env_file" ]]; then
  echo "error: $env_file not found. Run: cp .env.example $env_file, then set every change-me value." >&2
  exit 2
fi
bad=$(grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "$env_file" | grep -E '=.*change-me' | cut -d= -f1 || true)
required=(POSTGRES_PASSWORD S3_ROOT_PASSWORD MLFLOW_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY MLFLOW_TRAINER_PASSWORD)
for name in "${required[@]}"; do
  value=$(grep -E "^${name}=" "$env_file" | tail -n 1 | cut -d= -f2- || true)
  [[ -n "$value" ]] || bad+=$'\n'"$name"
done
bad=$(echo "$bad" | sed '/^$/d' | sort -u)
if [[ -n "$bad" ]]; then
  echo "error: $env_file still has placeholder or empty secrets; set real values for:" >&2
  echo "$bad" | sed 's/^/  - /' >&2
  exit 1
fi
