#!/usr/bin/env bash
# The training case of the bench on a GPU: a fine-tune of BERT-large's shape (335M parameters,
# 4 GB checkpoints: weights and AdamW state) untracked, with transformers' stock MLflowCallback
# storing every checkpoint, and with our callback doing the same.
#
#   bash bench/gpu_wheels.sh                     # here, where pip reaches PyPI: .whl/ (52 MB)
#   bash bench/gpu_case.sh OUT_DIR [bench.py options]   # on the GPU machine, .whl/ carried along
#
# The GPU machines lent to this project have CUDA PyTorch and nothing of the stack, and reach no
# network: no PostgreSQL, no S3 server, no container engine. So the server here is MLflow's own
# (`mlflow server`, the version of requirements-dev.lock) with a SQLite store and artifacts on
# local disk, every byte proxied through it, as the compose stack's default is. Both tracked modes
# go through the same server; what differs is the trainer side, which is what this case is about.
# With GPU_CASE_WHEELS empty it installs nothing and uses the Python it is given; a rehearsal on
# CPU: `GPU_CASE_WHEELS= PYTHON=.venv/bin/python bash bench/gpu_case.sh /tmp/gpu-rehearsal
# --device cpu --train-model tiny32 --train-steps 4 --save-every 2`.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/gpu_case.sh OUT_DIR [bench.py options]}
shift
py=${PYTHON:-python3}
work=${GPU_CASE_WORK:-}  # the server's store, the checkpoints and the wheels' install
port=${GPU_CASE_PORT:-}
wheels=${GPU_CASE_WHEELS-.whl}
if [ -z "$work" ]; then
    work=$PWD/.gpu-work
    rm -rf "$work"  # our own folder (git ignores it), left by the last run
elif [ -e "$work" ]; then
    echo "GPU_CASE_WORK=$work exists: name a folder that does not, the case fills it" >&2
    exit 2
fi
mkdir -p "$work" "$out"
out=$(cd "$out" && pwd)

if [ -n "$wheels" ]; then
    echo ">>> installing $(ls "$wheels" | wc -l) wheels beside the machine's own packages"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" "$wheels"/*.whl
    export PYTHONPATH="$work/site"
fi
export PYTHONPATH="$PWD/trainer${PYTHONPATH:+:$PYTHONPATH}"
export TMPDIR="$work"  # checkpoints on the disk the server stores to, not a RAM-backed /tmp
"$py" - <<'PY'
import importlib.metadata as m
print(">>> " + ", ".join(f"{d} {m.version(d)}" for d in ("torch", "transformers", "mlflow", "datasets")))
PY
{ nvidia-smi || true; df -h "$work"; nproc; free -g; } >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

if [ -z "$port" ]; then  # a free one, so a server already on a fixed port is never the one measured
    port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
echo ">>> starting mlflow server on 127.0.0.1:$port (SQLite, artifacts in $work/artifacts)"
"$py" -m mlflow server --host 127.0.0.1 --port "$port" --workers 4 \
    --backend-store-uri "sqlite:///$work/mlflow.db" --artifacts-destination "$work/artifacts" \
    >"$out/mlflow-server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; true' EXIT
"$py" - "$port" "$server" "$out/mlflow-server.log" <<'PY'
import sys, time, urllib.request
port, pid, log = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]


def running(pid: int) -> bool:  # the script's child: once it exits, a zombie until the script reaps it
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


deadline = time.monotonic() + 180
while True:
    if not running(pid):
        sys.exit(f"mlflow server exited before answering; its log, {log}:\n" + open(log).read()[-3000:])
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
        break
    except OSError as exc:
        if time.monotonic() > deadline:
            sys.exit(f"mlflow server not answering on port {port} after 180 s: {exc}")
        time.sleep(1)
print(">>> mlflow server up")
PY

echo ">>> bench, free space: $(df -BG --output=avail "$work" | tail -1)"
PYTHONUNBUFFERED=1 "$py" bench/bench.py --tracking-uri "http://127.0.0.1:$port" --mlflow-pid "$server" \
    --cases train --torch-threads 0 --drop-stored --output "$out/bench-gpu.json" "$@"
