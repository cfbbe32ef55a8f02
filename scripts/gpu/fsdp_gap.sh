#!/usr/bin/env bash
# Where FSDP on one GPU loses to strategy=auto. 2026-11-24, H100, llama-1b through train.py at 4 x 2048: first 34.7% against 42.2% MFU;
# in the third session reshard_after_forward=false closed most of it (39.7% vs 33.6%, auto 41.3%, vocab 32000), and per-block
# compile was slower than whole-model compile (31.4% vs 33.7%, vocab 4096).
# in one command on a lent GPU, after acceptance.sh has installed .whl/ (or with .whl carried again):
#   run(command="OUT=$OUT bash scripts/gpu/fsdp_gap.sh", carry=[".whl"], timeout_s=600)
# Cells: auto vs fsdp:1, each with a whole-model compile (`true`: under FSDP2 dynamo breaks its graph at every
# FSDP unit's hooks) and per-block compile (torchtitan's way, compiled before fully_shard); then fsdp:1 with
# strategy.reshard_after_forward=false (no re-gather in backward). The table lands in $OUT/matrix.md.
set -uo pipefail
OUT=${OUT:-logs/gpu_acceptance}
mkdir -p "$OUT"
[ -d /tmp/site/hydra ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 LMFORGE_ROOT="$PWD"
common=(--models llama-1b --precisions bf16-mixed --block 2048 --batch 4 --steps 30)
timeout 400 python3 scripts/benchmark.py matrix "${common[@]}" --strategies auto fsdp:1 --compile true per_block \
    --out "$OUT/fsdp_gap" 2>&1 | tail -12 | tee "$OUT/fsdp_gap.txt"
timeout 180 python3 scripts/benchmark.py matrix "${common[@]}" --strategies fsdp:1 --compile per_block \
    --out "$OUT/fsdp_gap_noreshard" -- strategy.reshard_after_forward=false 2>&1 | tail -6 | tee -a "$OUT/fsdp_gap.txt"
