#!/usr/bin/env python3
"""Throughput against table size for each dtype, next to memcpy bandwidth.

Runs `emb bench --json` for table sizes from 256 KiB to 4 GiB (dim 64, 1M uniform lookups,
f32 output) for f32, f16 and bf16 tables, saves the raw results as JSON and draws an SVG
(no plotting library needed). Each point's memcpy bandwidth is measured in the same process.

    cargo build --release
    python3 benches/plot/size_sweep.py [--emb target/release/emb] [--out benches/plot]
"""

import argparse
import json
import math
import subprocess
from pathlib import Path

DIM = 64
BATCH = 1 << 20
SIZES = [1 << s for s in range(18, 33, 2)]  # 256 KiB .. 4 GiB of f32-equivalent table
DTYPES = {"f32": 4, "f16": 2, "bf16": 2}
COLORS = {"f32": "#1f77b4", "f16": "#d62728", "bf16": "#2ca02c", "memcpy": "#555555"}


def run(emb, rows, dtype, threads, iters):
    cmd = [emb, "bench", "--rows", str(rows), "--dim", str(DIM), "--dtype", dtype,
           "--batch", str(BATCH), "--iters", str(iters), "--json"]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def svg(results, path):
    w, h, left, right, top, bottom = 760, 440, 70, 150, 30, 60
    xs = [math.log2(r["table_bytes"]) for r in results]
    x0, x1 = min(xs), max(xs)
    ymax = max(max(r["bytes_per_s"], r["memcpy_bytes_per_s"]) for r in results) / 1e9 * 1.1

    def px(b):
        return left + (math.log2(b) - x0) / (x1 - x0) * (w - left - right)

    def py(v):
        return h - bottom - v / ymax * (h - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{w / 2 - 150}" y="18" font-size="14">Lookup throughput vs table size '
             f'(dim {DIM}, 1M uniform lookups)</text>']
    for g in range(0, int(ymax) + 1, 5):
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{py(g):.1f}" y2="{py(g):.1f}" '
                     f'stroke="#ddd"/><text x="{left - 8}" y="{py(g) + 4:.1f}" '
                     f'text-anchor="end">{g}</text>')
    for b in sorted({r["table_bytes"] for r in results}):
        label = f"{b >> 30} GiB" if b >= 1 << 30 else (f"{b >> 20} MiB" if b >= 1 << 20 else f"{b >> 10} KiB")
        parts.append(f'<text x="{px(b):.1f}" y="{h - bottom + 18}" text-anchor="middle">{label}</text>')
    parts.append(f'<text x="{w / 2 - 60}" y="{h - 15}">table size (bytes)</text>')
    parts.append(f'<text x="18" y="{h / 2}" transform="rotate(-90 18 {h / 2})">GB/s (read + written)</text>')
    series = {d: [r for r in results if r["dtype"] == d] for d in DTYPES}
    series["memcpy"] = [dict(r, bytes_per_s=r["memcpy_bytes_per_s"]) for r in results if r["dtype"] == "f32"]
    for i, (name, rs) in enumerate(series.items()):
        pts = " ".join(f'{px(r["table_bytes"]):.1f},{py(r["bytes_per_s"] / 1e9):.1f}' for r in rs)
        dash = ' stroke-dasharray="6 4"' if name == "memcpy" else ""
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{COLORS[name]}" stroke-width="2"{dash}/>')
        for r in rs:
            parts.append(f'<circle cx="{px(r["table_bytes"]):.1f}" cy="{py(r["bytes_per_s"] / 1e9):.1f}" '
                         f'r="3" fill="{COLORS[name]}"/>')
        ly = top + 20 + i * 20
        label = "memcpy (same run)" if name == "memcpy" else f"{name} table → f32"
        parts.append(f'<line x1="{w - right + 10}" x2="{w - right + 35}" y1="{ly}" y2="{ly}" '
                     f'stroke="{COLORS[name]}" stroke-width="2"{dash}/>'
                     f'<text x="{w - right + 40}" y="{ly + 4}">{label}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--emb", default="target/release/emb")
    ap.add_argument("--out", default="benches/plot")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--iters", type=int, default=9)
    args = ap.parse_args()
    out = Path(args.out)
    results = []
    for size in SIZES:
        for dtype, width in DTYPES.items():
            rows = size // (DIM * 4)  # same rows for every dtype: f32-equivalent size
            r = run(args.emb, rows, dtype, args.threads, args.iters)
            r["table_bytes"] = rows * DIM * width
            results.append(r)
            print(f'{dtype:5} {r["table_bytes"]:>11} B  {r["rows_per_s"] / 1e6:7.1f} M rows/s  '
                  f'{r["bytes_per_s"] / 1e9:6.2f} GB/s  memcpy {r["memcpy_bytes_per_s"] / 1e9:6.2f} GB/s  '
                  f'ratio {r["ratio_to_memcpy"]:.2f}', flush=True)
    (out / "size_sweep.json").write_text(json.dumps(results, indent=1))
    svg(results, out / "size_sweep.svg")


if __name__ == "__main__":
    main()
