"""Out-of-memory boundary (``--fod-oom``): the largest L each provider can train at batch 8.

One training step (forward + backward, B=8, H=8, D=32, float32) per trial, each in a fresh
subprocess under a memory cap: on CPU ``RLIMIT_AS`` = the process's address space after set-up
plus the cap (default 16 GiB, ``--fod-oom-cap-gb``); on CUDA the device's own memory. L doubles
from 256 until a trial runs out of memory, then bisection narrows the boundary to 1/16 of L.
A trial that exceeds ``--fod-oom-trial-seconds`` ends the search: the boundary is then only
bounded below (the O(L)-memory kernels run out of time long before memory). A quadratic fit
a*L^2 + b*L + c of the measured peaks predicts where the cap would be reached.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import providers as P

B, D = 8, 32


def _mem_available():
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) * 1024
    return 0


def _predict(trials, cap):
    pts = [(t["L"], t["peak_bytes"]) for t in trials if t["status"] == "ok" and t.get("peak_bytes")]
    if len(pts) < 3:
        return None
    L = np.array([p[0] for p in pts], float)
    y = np.array([p[1] for p in pts], float)
    a, b, c = np.linalg.lstsq(np.stack([L * L, L, np.ones_like(L)], 1), y, rcond=None)[0]
    a = max(a, 0.0)
    if a > 0:
        disc = b * b + 4 * a * (cap - c)
        return int((-b + math.sqrt(max(disc, 0.0))) / (2 * a))
    return int((cap - c) / b) if b > 0 else None


def search(provider, device, cap, trial_seconds, log):
    trials = []

    def trial(L):
        r = P.oom_trial_subprocess(provider, B, L, D, device, cap, trial_seconds)
        t = {"L": L, "status": r.get("status", "crash"), "peak_bytes": r.get("peak_bytes"),
             "seconds": r.get("seconds", r.get("wall_s")), "error": r.get("error")}
        trials.append(t)
        log(f"oom search {provider}/{device}: L={L} -> {t['status']} {t['error'] or ''}")
        return t["status"]

    ok_L = fail_L = None
    ended = None
    L = 256
    while L <= 1 << 22:
        st = trial(L)
        if st == "ok":
            ok_L, L = L, 2 * L
            continue
        if st == "oom":
            fail_L = L
        elif st == "timeout":
            ended = f"trial time limit ({trial_seconds} s) at L={L} before memory ran out"
        else:
            ended = f"trial failed at L={L}: {trials[-1]['error']}"
        break
    if fail_L is not None and ok_L is not None:
        ended = "out of memory"
        while fail_L - ok_L > max(32, ok_L // 16):
            mid = (ok_L + fail_L) // 2 // 32 * 32
            if mid <= ok_L:
                break
            st = trial(mid)
            if st == "ok":
                ok_L = mid
            elif st == "oom":
                fail_L = mid
            else:
                ended = f"out of memory; bisection stopped by {st} at L={mid}"
                break
    elif fail_L is not None:
        ended = "out of memory at the first trial"
    return {"L_ok": ok_L, "L_fail": fail_L, "ended": ended, "trials": trials, "L_predicted": _predict(trials, cap)}


def test_oom_boundary(benchmark, fod_session, oom_case, capsys):
    name, device = oom_case["provider"], oom_case["device"]
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ok, why = fod_session.provider(name).availability(device, torch.float32)
    if not ok:
        pytest.skip(f"{name}: {why}")
    if device == "cuda":
        cap = torch.cuda.get_device_properties(0).total_memory
    else:
        cap = int(fod_session.config.getoption("--fod-oom-cap-gb") * 2**30)
        if _mem_available() < cap + 2**30:
            pytest.skip(f"only {_mem_available() / 2**30:.1f} GiB of memory available, the search needs the "
                        f"{cap / 2**30:.0f} GiB cap + 1 GiB (lower it with --fod-oom-cap-gb)")
    seconds = fod_session.config.getoption("--fod-oom-trial-seconds")

    def log(msg):
        with capsys.disabled():
            print(msg, flush=True)

    benchmark.group = f"oom boundary B{B} D{D} float32 {device}"
    res = benchmark.pedantic(search, args=(name, device, cap, seconds, log), rounds=1, iterations=1)
    benchmark.extra_info.update(dict(kind="oom", provider=name, device=device, B=B, H=P.H, D=D, dtype="float32",
                                     cap_bytes=cap, **res))
    assert res["L_ok"] is not None or res["L_fail"] == 256, f"no trial ran: {res['ended']}"
