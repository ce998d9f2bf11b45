#!/usr/bin/env bash
# Every `emb bench` figure quoted in BENCHMARKS.md, in one run. Each line carries its own
# same-process baselines (memcpy with the same threads; the naive loop for f32).
#   bash benches/measure.sh [THREADS] > results.txt
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
cargo build --release -q
emb() { ./target/release/emb bench --threads "$threads" --iters "${ITERS:-11}" "$@" 2>/dev/null; }

echo "## lookup targets"
emb --rows 4194304 --dim 64 --dtype f32 --batch 1048576
emb --rows 1048576 --dim 256 --dtype f32 --batch 1048576
ITERS=501 emb --rows 4096 --dim 64 --dtype f32 --batch 4096
emb --rows 4194304 --dim 64 --dtype f16 --batch 1048576
emb --rows 4194304 --dim 64 --dtype bf16 --batch 1048576
emb --rows 4194304 --dim 64 --dtype f32 --batch 1048576 --storage mmap
emb --rows 4194304 --dim 64 --dtype f32 --batch 1048576 --dist zipf:1.05

echo "## prefetch distance (f32 4M x 64, 1M uniform)"
for p in 0 4 8 16 32 64; do
  emb --rows 4194304 --dim 64 --batch 1048576 --prefetch "$p" | sed -n 1,2p
done

echo "## max_norm and bags (f32 4M x 64, 1M uniform; beside the plain lookup)"
emb --rows 4194304 --dim 64 --batch 1048576 --op renorm
emb --rows 4194304 --dim 64 --batch 1048576 --op renorm --renorm in-place
for mode in sum max; do
  emb --rows 4194304 --dim 64 --batch 1048576 --op bag --bag-size 32 --mode "$mode"
done
emb --rows 4194304 --dim 64 --dtype f16 --batch 1048576 --op bag --bag-size 32 --mode sum

echo "## streaming stores (f32 4M x 64; batch sets the output size)"
for b in 65536 131072 262144 1048576; do
  for s in never always; do
    emb --rows 4194304 --dim 64 --batch "$b" --stream "$s" | sed -n 1,2p
  done
done
