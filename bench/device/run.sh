#!/usr/bin/env bash
# The GPU benchmark as one prepared run on the device machine (prepare with bench/device/prepare.sh first):
# installs the carried wheels, starts the carried redis-server on 127.0.0.1:6379, runs `bench.run --quick` on
# CUDA (micro-batched detectors, the tiny and the ViT-B daemon at GPU rates, the tensor-core peak), then
# bench.compile, and leaves the report, the logs (compile.log: model.compile's rows) and the GPU's name in $OUT.
# BENCH_ARGS adds arguments to the report, BENCH_TIMEOUT / BENCH_COMPILE_TIMEOUT bound its two parts (s),
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
# the report first (its own timeout, and in $OUT before a slow compile below can reach the device call's 600 s
# limit: what is in $OUT then still comes back), then model.compile's modes on their
# own (bench.compile: WinCLIP 0-shot at the report's micro-batch, eager vs default vs reduce-overhead = CUDA graphs)
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
timeout "${BENCH_TIMEOUT:-480}" python3 -m bench.run --quick --device "${BENCH_DEVICE:-cuda}" \
    --sections peak detectors daemon sweeps bf16 gpu \
    --daemon-arch inspectd-tiny ViT-B-16-plus-240 --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
status=${PIPESTATUS[0]}
timeout "${BENCH_COMPILE_TIMEOUT:-100}" python3 -m bench.compile --quick --device "${BENCH_DEVICE:-cuda}" \
    --arch "${BENCH_COMPILE_ARCH:-ViT-B-16-plus-240}" 2>&1 | tee "$OUT/compile.log"
exit "$status"
