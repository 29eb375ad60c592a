"""Turn pytest-benchmark JSON from benchmarks/ into a markdown report and log-log plots.

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json [more.json ...] [--out benchmarks/results] [--name report]

Writes <out>/<name>.md and, when the JSON holds sweep cases (--fod-sweep), <out>/<name>_time_vs_L.png and
<out>/<name>_memory_vs_L.png. Ratios are computed here: each provider's median time (and peak memory)
divided by that of "official" (the public FOD code's way) and of "sdpa" (two fused attentions, the bound)
on the same case; and the fused backends against "reference".
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

ORDER = ("cuda", "triton", "cpu", "compile", "reference", "official", "sdpa")
MODES = ("forward", "backward", "fwd+bwd", "infer")
MODE_TITLE = {"forward": "forward", "backward": "backward", "fwd+bwd": "forward + backward",
              "infer": "inference-only scoring (stats for inter only)"}


def load(paths):
    rows, machines = [], []
    for p in paths:
        data = json.loads(Path(p).read_text())
        machines.append((p, data.get("machine_info", {}), data.get("commit_info", {}), data.get("datetime", "")))
        for b in data.get("benchmarks", []):
            e = dict(b.get("extra_info", {}))
            if not e.get("kind"):
                continue
            st = b.get("stats", {})
            e.setdefault("median_s", st.get("median"))
            e.setdefault("iqr_s", st.get("iqr"))
            e["name"] = b.get("name")
            rows.append(e)
    return rows, machines


def fmt_t(s):
    if s is None:
        return "-"
    return f"{s * 1e3:.3g}" if s * 1e3 < 100 else f"{s * 1e3:.0f}"


def fmt_mib(b):
    return "-" if b is None else f"{b / 2**20:.1f}" if b < 100 * 2**20 else f"{b / 2**20:.0f}"


def fmt_ratio(a, b):
    if a is None or b is None or not b:
        return "-"
    r = a / b
    return f"{r:.2f}" if r < 100 else f"{r:.0f}"


def _prov_key(p):
    return ORDER.index(p) if p in ORDER else len(ORDER)


def machine_section(machines):
    out = ["## Machine", ""]
    for path, mi, ci, dt in machines:
        fod = mi.get("fod", {})
        cpu = fod.get("cpu_model") or (mi.get("cpu") or {}).get("brand_raw", "?")
        out.append(f"- source `{Path(path).name}`, {dt}, commit `{str(ci.get('id', '?'))[:10]}`"
                   f"{' (dirty tree)' if ci.get('dirty') else ''}")
        out.append(f"- CPU: {cpu}, {(mi.get('cpu') or {}).get('count', '?')} logical cores, torch threads "
                   f"{fod.get('threads', '?')}; GPU: {fod.get('gpu', 'none')}")
        out.append(f"- python {mi.get('python_version', '?')}, torch {fod.get('torch', '?')} "
                   f"(CUDA {fod.get('torch_cuda')}), triton {fod.get('triton', '?')}")
        if fod.get("load_average_at_end"):
            out.append(f"- load average (1, 5, 15 min) when the run ended: "
                       f"{', '.join(f'{x:.1f}' for x in fod['load_average_at_end'])} (a shared machine: "
                       "read times with their IQR)")
        for name, (ok, why) in (fod.get("backends") or {}).items():
            out.append(f"- backend `{name}`: {'available' if ok else 'unavailable'} ({why})")
    return out + [""]


def operator_tables(rows, kind):
    out = []
    sel = [r for r in rows if r.get("kind") == kind]
    by = defaultdict(dict)
    for r in sel:
        by[(r["device"], r["dtype"], r["mode"], r["B"], r["L"], r["D"])][r["provider"]] = r
    for device, dtype in sorted({(k[0], k[1]) for k in by}):
        for mode in MODES:
            keys = sorted(k for k in by if k[:3] == (device, dtype, mode))
            if not keys:
                continue
            out += [f"### {kind}: {MODE_TITLE[mode]}, {dtype}, {device}", "",
                    "| B | L | D | provider | median ms | IQR ms | TFLOP/s | peak MiB | time / official | "
                    "time / sdpa | mem / official |",
                    "|---|---|---|---|---|---|---|---|---|---|---|"]
            for k in keys:
                cell = by[k]
                off, sd = cell.get("official"), cell.get("sdpa")
                for prov in sorted(cell, key=_prov_key):
                    r = cell[prov]
                    pk = r.get("peak_bytes")
                    out.append(
                        f"| {k[3]} | {k[4]} | {k[5]} | {prov} | {fmt_t(r['median_s'])} | {fmt_t(r.get('iqr_s'))} | "
                        f"{r.get('tflops', 0):.3g} | {fmt_mib(pk) if pk is not None else r.get('mem_error', '-')} | "
                        f"{fmt_ratio(r['median_s'], off and off['median_s'])} | "
                        f"{fmt_ratio(r['median_s'], sd and sd['median_s'])} | "
                        f"{fmt_ratio(pk, off and off.get('peak_bytes'))} |")
            out.append("")
    return out


def fused_vs_reference(rows):
    """Speed-up and memory saving of each fused backend over the materialising reference."""
    by = defaultdict(dict)
    for r in rows:
        if r.get("kind") in ("operator", "sweep"):
            by[(r["device"], r["dtype"], r["mode"], r["B"], r["L"], r["D"])][r["provider"]] = r
    out = ["## Fused backends against the reference", "",
           "Speed-up = reference median / backend median; memory ratio = reference peak / backend peak.", "",
           "| device | dtype | mode | B | L | D | backend | backend ms | reference ms | speed-up | "
           "backend peak MiB | reference peak MiB | memory ratio |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    n = 0
    for k in sorted(by, key=lambda k: (k[0], k[1], MODES.index(k[2]), k[3], k[4], k[5])):
        cell = by[k]
        ref = cell.get("reference")
        if ref is None:
            continue
        for b in ("cpu", "cuda", "triton"):
            if b in cell:
                r = cell[b]
                out.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {k[4]} | {k[5]} | {b} | {fmt_t(r['median_s'])} | "
                           f"{fmt_t(ref['median_s'])} | {fmt_ratio(ref['median_s'], r['median_s'])} | "
                           f"{fmt_mib(r.get('peak_bytes'))} | {fmt_mib(ref.get('peak_bytes'))} | "
                           f"{fmt_ratio(ref.get('peak_bytes'), r.get('peak_bytes'))} |")
                n += 1
    return out + [""] if n else []


def oom_table(rows):
    sel = [r for r in rows if r.get("kind") == "oom"]
    if not sel:
        return []
    out = ["## Out-of-memory boundary (forward + backward, B=8, H=8, D=32, float32)", "",
           "| device | provider | memory cap GiB | largest L that ran | smallest L that failed | "
           "how the search ended | "
           "L predicted from measured peaks |", "|---|---|---|---|---|---|---|"]
    for r in sorted(sel, key=lambda r: (r["device"], _prov_key(r["provider"]))):
        out.append(f"| {r['device']} | {r['provider']} | {r['cap_bytes'] / 2**30:.0f} | {r.get('L_ok') or '-'} | "
                   f"{r.get('L_fail') or '-'} | {r.get('ended', '-')} | {r.get('L_predicted') or '-'} |")
    return out + [""]


def model_table(rows):
    sel = [r for r in rows if r.get("kind") == "model"]
    if not sel:
        return []
    out = ["## Full FOD model", "", "| device | backend | what | B | median ms | IQR ms | peak MiB |",
           "|---|---|---|---|---|---|---|"]
    for r in sorted(sel, key=lambda r: (r["device"], r["what"], _prov_key(r["provider"]))):
        out.append(f"| {r['device']} | {r['provider']} | {r['what']} | {r['B']} | {fmt_t(r['median_s'])} | "
                   f"{fmt_t(r.get('iqr_s'))} | {fmt_mib(r.get('peak_bytes'))} |")
    return out + [""]


def anomaly_transformer_table(rows):
    """Issue 22: one training step of the Anomaly Transformer, official formulation against ours."""
    sel = [r for r in rows if r.get("kind") == "anomaly_transformer"]
    if not sel:
        return []
    c = sel[0]
    out = ["## Anomaly Transformer: one training step (forward, loss, backward, Adam)", "",
           f"batch {c.get('B')}, d_model {c.get('d_model')}, {c.get('n_heads')} heads, {c.get('e_layers')} layers, "
           f"d_ff {c.get('d_ff')}, {c.get('C')} channels, float32. `linear`: our step without the operator "
           "(attention output = values), the floor outside it. A step over the memory cap is not timed; its "
           "peak is predicted from the provider's largest measured window (L^2 official, L the others).", "",
           "| device | window | provider | median ms | IQR ms | peak MiB | official / ours time | "
           "official / ours memory |", "|---|---|---|---|---|---|---|---|"]
    by = defaultdict(dict)
    for r in sel:
        by[(r["device"], r["L"])][r["provider"]] = r
    measured = defaultdict(list)  # provider -> [(L, peak)] for the predictions of the steps over the cap
    for r in sel:
        if r.get("peak_bytes"):
            measured[(r["device"], r["provider"])].append((r["L"], r["peak_bytes"]))
    for key in sorted(by):
        cell = by[key]
        off, ours = cell.get("official", {}), cell.get("ours", {})
        for prov in ("official", "ours", "linear"):
            r = cell.get(prov)
            if r is None:
                continue
            if r.get("mem_status") not in (None, "ok"):
                pred = None
                if measured[(key[0], prov)]:
                    Lm, peak = max(measured[(key[0], prov)])
                    pred = peak * (key[1] / Lm) ** (2 if prov == "official" else 1)
                mem = (f"{r['mem_status']} at a {r['cap_bytes'] / 2**30:.0f} GiB cap"
                       + (f" (predicted {pred / 2**30:.1f} GiB)" if pred else ""))
            else:
                mem = fmt_mib(r.get("peak_bytes"))
            ratios = (f"{fmt_ratio(off.get('median_s'), ours.get('median_s'))} | "
                      f"{fmt_ratio(off.get('peak_bytes'), ours.get('peak_bytes'))}") if prov == "ours" else "| "
            out.append(f"| {key[0]} | {key[1]} | {prov} | {fmt_t(r.get('median_s'))} | {fmt_t(r.get('iqr_s'))} | "
                       f"{mem} | {ratios} |")
    return out + [""]


def plots(rows, out_dir, name):
    sel = [r for r in rows if r.get("kind") == "sweep"]
    if not sel:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    combos = sorted({(r["device"], r["dtype"]) for r in sel})
    modes = [m for m in MODES if any(r["mode"] == m for r in sel)]
    for metric, label, fname in (("median_s", "median time (s)", "time_vs_L"),
                                 ("peak_bytes", "peak memory (bytes)", "memory_vs_L")):
        fig, axes = plt.subplots(len(combos), len(modes), figsize=(5.5 * len(modes), 4.2 * len(combos)),
                                 squeeze=False)
        for i, (device, dtype) in enumerate(combos):
            for j, mode in enumerate(modes):
                ax = axes[i][j]
                pts = defaultdict(list)
                for r in sel:
                    if (r["device"], r["dtype"], r["mode"]) == (device, dtype, mode) and r.get(metric):
                        pts[r["provider"]].append((r["L"], r[metric]))
                for prov in sorted(pts, key=_prov_key):
                    xs, ys = zip(*sorted(pts[prov]))
                    ax.plot(xs, ys, marker="o", label=prov)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("L (tokens = keys)")
                ax.set_ylabel(label)
                ax.set_title(f"{MODE_TITLE[mode]}\nB=1 H=8 D=32 {dtype} {device}", fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
                if pts:
                    ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(out_dir) / f"{name}_{fname}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--name", default="report")
    ap.add_argument("--command", default="", help="the command that produced the JSON, quoted in the report")
    args = ap.parse_args(argv)
    rows, machines = load(args.json)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = plots(rows, out_dir, args.name)
    md = ["# FOD I2Correlation benchmarks", "",
          "One FOD layer: intra + inter branch with the FOD losses (providers: see benchmarks/providers.py). "
          "TFLOP/s counts 4*B*H*L*S*D per branch for a forward (x2.5 backward, x3.5 forward+backward), two "
          "branches, statistics not counted. Peak memory: growth above the inputs (and, for the backward, above the "
          "saved forward state) during one call; CPU from the resident set of a fresh subprocess, CUDA from the "
          "caching allocator. Providers that could not run are listed under Machine with the reason.", ""]
    if args.command:
        md += ["Produced by:", "", "```", args.command, "```", ""]
    md += machine_section(machines)
    md += fused_vs_reference(rows)
    md += operator_tables(rows, "operator")
    md += model_table(rows)
    md += anomaly_transformer_table(rows)
    md += oom_table(rows)
    if files:
        md += ["## Scale sweep", ""] + [f"![{f.stem}]({f.name})" for f in files] + [""]
        md += operator_tables(rows, "sweep")
    path = out_dir / f"{args.name}.md"
    path.write_text("\n".join(md))
    print(f"wrote {path}" + "".join(f", {f}" for f in files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
