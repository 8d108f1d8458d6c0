#!/usr/bin/env bash
# `compose run --rm` whose exit status can be trusted, on Docker and on podman alike.
#
# Usage: infra/compose-run.sh <compose command and its options...> run [run options] SERVICE [args...]
#   e.g. infra/compose-run.sh docker compose --env-file .env -f docker-compose.yml run users-init
#
# Why: podman's Docker API (measured on podman 4.3) answers exit status 0 for a `compose run --rm`
# container whatever the container exited with, so a failed one-shot job (users-init, gc, an upgrade
# step, a trainer) would look like a success. Without --rm the status comes through on both engines,
# so the container runs under a name of our own and is removed here afterwards, also on Ctrl-C.
set -uo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 <compose command...> run [run options] SERVICE [args...]" >&2
    exit 2
fi

name="mlstack-run-$(date +%s)-$$-${RANDOM}"
command=()
run_seen=0
for word in "$@"; do
    if [[ $run_seen -eq 0 && $word == run ]]; then
        command+=(run --name "$name")
        run_seen=1
    elif [[ $run_seen -eq 1 && $word == --rm ]]; then
        continue  # removed below instead, once its status is read
    else
        command+=("$word")
    fi
done
if [[ $run_seen -eq 0 ]]; then
    echo "$0: no 'run' in the command: $*" >&2
    exit 2
fi

remove() { docker rm -f "$name" >/dev/null 2>&1 || true; }
trap 'remove; exit 130' INT
trap 'remove; exit 143' TERM

"${command[@]}"
status=$?
remove
exit "$status"
