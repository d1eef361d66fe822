#!/usr/bin/env bash
# The GPU benchmark as one prepared run on the device machine (prepare with bench/device/prepare.sh first):
# installs the carried wheels, starts the carried redis-server on 127.0.0.1:6379, runs `bench.run --quick` on
# CUDA (micro-batched detectors, the tiny and the ViT-B daemon at GPU rates, the tensor-core peak) and leaves
# the report, the log and the GPU's name in $OUT. BENCH_ARGS adds arguments, BENCH_TIMEOUT bounds the run (s),
# BENCH_DEVICE=cpu smoke-tests the script on a machine without a GPU (with that machine's own packages).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/inspectd-device}
mkdir -p "$OUT"
if [ "${BENCH_DEVICE:-cuda}" = cpu ]; then  # the smoke test: this machine's own install (its Python may not be 3.12)
    export PYTHONPATH="$PWD"
else
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD"
fi
redis_up() { python3 -c "import redis; redis.Redis(socket_timeout=1).ping()" 2>/dev/null; }
if redis_up; then
    echo "a Redis already answers on 127.0.0.1:6379: using it"
else
    LD_LIBRARY_PATH="$PWD/.redis/lib" .redis/redis-server --port 6379 --bind 127.0.0.1 --save '' --appendonly no \
        --daemonize yes --pidfile "$OUT/redis.pid" --logfile "$OUT/redis.log" \
        || { echo "redis-server did not start"; exit 1; }
    trap 'kill "$(cat "$OUT/redis.pid" 2>/dev/null)" 2>/dev/null; rm -f "$OUT/redis.pid"' EXIT  # ours: stop it
    for _ in $(seq 100); do redis_up && break; sleep 0.1; done
    redis_up || { echo "redis-server started but does not answer (see $OUT/redis.log)"; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
python3 -c "import torch, open_clip; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'open_clip', open_clip.__version__)" | tee "$OUT/versions.txt"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
timeout "${BENCH_TIMEOUT:-480}" python3 -m bench.run --quick --device "${BENCH_DEVICE:-cuda}" \
    --daemon-arch inspectd-tiny ViT-B-16-plus-240 --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
exit "${PIPESTATUS[0]}"
