"""The floor of one I2Correlation branch forward+backward on this CPU, and the report of
test_bench_cpu_floor.py (docs/CPU_FLOOR.md explains the arithmetic).

    pytest benchmarks/test_bench_cpu_floor.py --benchmark-only --fod-cpu-floor --benchmark-json=floor.json
    python benchmarks/cpu_floor.py floor.json > floor.md

Work per (query i, key j) of one branch forward+backward (eps > 0, statistics on), counted from
csrc/cpu/i2corr_cpu.cpp:
  GEMM: 7 passes of 2 D flops (forward Q K^T, P V; backward Q K^T again, G V^T, dS K, dS^T Q, P^T G);
  exp: 2 (softmax, and p recomputed in the backward); log: 4 (log(p + eps), log(t + eps), forward and backward);
  division: 3 (p / (p + eps) forward; p / (p + eps), t / (t + eps) backward), besides the one inside each log.
SDPA forward+backward (ATen's flash-attention CPU kernel) does the same 7 GEMM passes and 2 exp per (i, j).
The floor is the time of that work at the rates measured in the same run: sgemm GFLOP/s (torch.mm, MKL/oneDNN at
the full vector width) and exp, log, division per second (torch.exp, torch.log, torch.div on a large float32
tensor: ATen's vectorised Sleef/intrinsics code at the widest width, which is what a polynomial of ours reaches
at best). Elementwise adds, multiplies and the memory traffic of the score blocks are not counted: the floor is
a lower bound.
"""
from __future__ import annotations

import json
import sys

GEMM_PASSES = 7
PER_PAIR = {"exp": 2, "log": 4, "div": 3}


def floor_seconds(B: int, H: int, L: int, D: int, rates: dict) -> dict:
    """rates: {"sgemm": flop/s, "exp": /s, "log": /s, "div": /s} -> seconds per part and "total"."""
    pairs = B * H * L * L
    out = {"gemm": GEMM_PASSES * 2 * D * pairs / rates["sgemm"]}
    out.update({k: n * pairs / rates[k] for k, n in PER_PAIR.items()})
    out["total"] = sum(out.values())
    return out


def load(path):
    with open(path) as f:
        data = json.load(f)
    return data.get("machine_info", {}), [b for b in data["benchmarks"] if b.get("extra_info", {}).get("floor_kind")]


def report(path) -> str:
    machine, rows = load(path)
    rates = {r["extra_info"]["rate_of"]: r["extra_info"]["rate_per_s"] for r in rows
             if r["extra_info"]["floor_kind"] == "rate"}
    runs = [r for r in rows if r["extra_info"]["floor_kind"] == "branch"]
    if not runs:
        return "no branch results in " + str(path)
    e = runs[0]["extra_info"]
    out = ["# One I2Correlation branch forward+backward on the CPU: kernel, SDPA, reference, floor", "",
           f"CPU: {e['cpu_model']}; torch CPU capability {e['torch_capability']}; {e['threads']} threads; "
           f"B={e['B']} H={e['H']} L={e['L']} D={e['D']} float32, eps={e['eps']}, statistics on. "
           "Several rounds each, all in one pytest-benchmark run on a shared machine (other jobs ran beside it). "
           "The ratios are of the fastest rounds (min): the least disturbed, so the most comparable across "
           "providers; the median and IQR show how much the other jobs took.", ""]
    best = {r["extra_info"]["provider"]: r["stats"]["min"] for r in runs}
    sdpa, ref = best.get("sdpa"), best.get("reference")
    fl = floor_seconds(e["B"], e["H"], e["L"], e["D"], rates) if set(rates) >= {"sgemm", *PER_PAIR} else None
    out += ["| provider | min | median | IQR | / SDPA | reference / it | / floor |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        m, x, st = r["stats"]["min"], r["extra_info"], r["stats"]
        name = x["provider"] + (f" ({x['variant']})" if x.get("variant") else "")
        head = f"| {name} | {m * 1e3:.1f} ms | {st['median'] * 1e3:.1f} ms | {st['iqr'] * 1e3:.1f} ms |"
        out.append(head + (f" {m / sdpa:.2f}x | {ref / m:.2f}x | {m / fl['total']:.2f}x |" if sdpa and ref and fl
                           else " | | |"))
    if fl:
        out += ["", "Floor (docs/CPU_FLOOR.md) at the rates measured in this run: "
                + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in fl.items()) + ".",
                "Rates: " + ", ".join(f"{k} {v / 1e9:.2f} G/s" for k, v in sorted(rates.items())) + "."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/cpu_floor.py RESULTS.json")
    print(report(sys.argv[1]), end="")
