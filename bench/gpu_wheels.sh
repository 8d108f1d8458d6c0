#!/usr/bin/env bash
# Wheels for bench/gpu_case.sh, fetched here (where pip reaches PyPI) for a GPU machine that
# reaches nothing: Python 3.12 on x86-64 with CUDA PyTorch, numpy, pandas, pyarrow and the
# Hugging Face libraries already installed (the GPU image this project's sessions are lent).
#
#   bash bench/gpu_wheels.sh [DIR]      (default .whl, which git ignores)
#
# What travels: MLflow (server and client), datasets and transformers at the versions of
# requirements-dev.lock, with every dependency the image lacks; what the image has and the
# trainer does not pin tighter (the numeric stack, the HTTP stack) stays out, so the whole set
# fits the 64 MiB a device call may carry.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
pins=$(grep -E '^(mlflow|datasets|transformers)==' requirements-dev.lock)
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
grep -E '^[A-Za-z0-9_.-]+==' requirements-dev.lock | grep -v '^torch==' >"$constraints"
rm -rf "$dest" && mkdir -p "$dest"
# shellcheck disable=SC2086  # one word per pin
python3 -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform manylinux_2_5_x86_64 -c "$constraints" -d "$dest" $pins
# The image's own copies of these serve: large, and not what the comparison is about.
image_has='numpy pandas pyarrow scipy scikit_learn matplotlib pillow fonttools kiwisolver contourpy cycler
pyparsing python_dateutil six tzdata narwhals hf_xet huggingface_hub tokenizers safetensors regex aiohttp
aiosignal aiohappyeyeballs frozenlist multidict propcache yarl attrs fsspec filelock tqdm joblib
threadpoolctl xxhash pyyaml markupsafe jinja2 charset_normalizer idna urllib3 certifi requests
accelerate psutil torch triton networkx sympy mpmath'
for name in $image_has; do
    rm -f "$dest/$name"-[0-9]*.whl
done
ls "$dest" | sed 's/-[0-9].*//' | sort | uniq -d | grep . && { echo "two versions of one package in $dest" >&2; exit 1; }
echo "$(ls "$dest" | wc -l) wheels, $(du -sh "$dest" | cut -f1) in $dest"
