#!/usr/bin/env bash
# Prepares, on the development machine, what the GPU machine lacks for bench/device/run.sh: Python 3.12 wheels of
# the dependencies its image does not hold (into .whl/) and this machine's redis-server with the shared libraries
# it links (into .redis/). Both are git-ignored; the device call names them in `carry`:
#
#   bash bench/device/prepare.sh                      # here, in the repository root (needs pip's registry)
#   device run: command "bash bench/device/run.sh", carry [".whl", ".redis"], timeout_s 540
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl .redis
mkdir -p .whl .redis/lib
# The device image has torch, torchvision, numpy, pillow, opencv, aiohttp, prometheus-client, pyyaml, safetensors,
# tqdm, timm, regex, huggingface-hub and anyio; these are the rest of pyproject.toml's dependencies.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "open_clip_torch>=2.24,<4" ftfy wcwidth "redis>=5.0" "hiredis>=3.0" "watchfiles>=0.21"
command -v redis-server >/dev/null \
    || { echo "no redis-server on this machine to carry (apt-get install redis-server)"; exit 1; }
server=$(readlink -f "$(command -v redis-server)")
cp "$server" .redis/redis-server  # the name matters: Debian's binary acts as the server only under this name
# (glibc itself stays behind: the device image's is newer than Debian 12's 2.36, which the binary needs)
ldd "$server" | awk '/=> \// {print $3}' | { grep -v -E '/(libc|libm|libpthread|libdl|librt)\.so' || true; } \
    | while read -r lib; do cp -L "$lib" .redis/lib/; done
du -sh .whl .redis
ls .whl
