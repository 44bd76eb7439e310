#!/usr/bin/env bash
# embedpipe's GPU check, on a machine with an NVIDIA GPU, the project's tree and no network.
# That machine is expected to have python3 with torch (CUDA), transformers, sentence-transformers,
# pyarrow, click, tqdm, scikit-learn and fsspec; what it lacks travels in gpu_carry/, which
# `make gpu-carry` fills here: a faiss-cpu wheel, a float16 copy of the bundled model's folder and
# 2,000 rows of the bench corpus. Installs the wheel into a private folder (no network), then runs
# `python -m bench.gpu_check` (precision, a real CUDA OOM, attention, throughput against
# SentenceTransformer.encode and the GPU's matmul rate, tokenizer feed). Prints a table and writes
# gpu_check.json under $OUT when set. Arguments go to the module (--rows, --rounds, --device cuda:N,
# --smoke). Exit codes: 0 all checks passed, 1 a check failed, 2 the environment cannot run it.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
CARRY=${GPU_CARRY:-gpu_carry}
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/embedpipe-gpu-site}

if ! "$PY" -c "import faiss" 2>/dev/null; then
    wheel=$(ls "$CARRY"/faiss_cpu-*.whl 2>/dev/null | head -n 1)
    if [ -z "$wheel" ]; then
        echo "error: faiss is not installed and $CARRY/ holds no faiss-cpu wheel; run \`make gpu-carry\` and carry $CARRY/" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$wheel" >&2 || { echo "error: cannot install $wheel into $SITE" >&2; exit 2; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PY" -m bench.gpu_check --carry "$CARRY" "$@"
