#!/usr/bin/env bash
# Tables larger than memory, end to end (BENCHMARKS.md, "Tables larger than memory"):
# write a 36 GiB f32 table (151M × 64, .npy), then time lookups from it cold and warm, with
# uniform and Zipf ids, beside the device's own 4 KiB random-read rate measured on the same file
# in the same run, and before/after: the resident policy (huge-page advice, pages faulted in one
# by one: what every mapped table got before the residency policy) against out-of-core.
#
#   benches/huge_table.sh [DIR]      DIR needs ~40 GB free (default target/huge); not for CI.
#   ROWS=... DIM=... BATCH=... to change the shape (the default table must exceed memory).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-target/huge}
ROWS=${ROWS:-151000000}
DIM=${DIM:-64}
BATCH=${BATCH:-1000000}
mkdir -p "$DIR"
cargo build --release --bin emb
EMB=target/release/emb
TABLE=$DIR/table_${ROWS}x${DIM}_f32.npy

echo "# CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) ($(grep -qo avx512f /proc/cpuinfo && echo AVX-512 || echo no AVX-512)); $(nproc) cores; $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
[ -f "$TABLE" ] || $EMB --verbose create "$TABLE" --rows "$ROWS" --dim "$DIM"

run() { echo "# emb bench --table $TABLE $*"; $EMB bench --table "$TABLE" --json "$@"; }
# Cold: the file's pages dropped before each batch.
run --cold --batch "$BATCH" --iters 3 --residency out-of-core
# Before: the resident policy on the same cold file (slow: fewer ids).
run --cold --batch 20000 --iters 1 --residency resident
# Warm steady state: batches of new ids one after another, the cache filling as they go.
run --batch "$BATCH" --iters 8
# Zipf(1.05) ids, cold then warm.
run --cold --batch "$BATCH" --iters 3 --dist zipf:1.05
run --batch "$BATCH" --iters 5 --dist zipf:1.05
