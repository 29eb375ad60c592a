"""Anomaly Transformer (fod_kernels.models, issue 22): one training step, the official formulation against ours.

    OMP_WAIT_POLICY=PASSIVE pytest benchmarks/test_bench_anomaly_transformer.py --benchmark-only --fod-threads 2
    OMP_WAIT_POLICY=PASSIVE pytest benchmarks/test_bench_anomaly_transformer.py --benchmark-only --fod-threads 2 \
        --at-windows 100,512,2048,8192 --fod-min-rounds 1

(OMP_WAIT_POLICY=PASSIVE: on a loaded machine OpenMP's spinning threads slow every step by up to 50x.)

A step is forward, loss, backward and one Adam step at batch 4, d_model 128, 8 heads, 3 layers, d_ff 128,
25 channels, float32 (the issue's target configuration). Providers, all on the same parameters:

- ``official``: the official code's formulation (thuml/Anomaly-Transformer, written here from its
  semantics): per layer the distance table repeated to (B, H, L, L), sigma repeated to (B, H, L, L), the
  Gaussian 1/(sqrt(2 pi) sigma) exp(-d^2 / (2 sigma^2)) materialised, the series softmax materialised, the
  prior normalised by its repeated row sum at each of its four uses in the losses, and two backward passes
  (the first with retain_graph) before the optimiser step;
- ``ours``: ``AnomalyTransformer`` on the fused operator (backend "auto"), one loss, one backward;
- ``linear``: the floor outside the operator: the same model with the attention replaced by its values
  (no L x L work, no statistics), loss = 2 * rec. ours - linear is the operator's share of the step.

Peak memory: growth of the resident set during one step (after a warm-up step on a short slice of the window
that allocates Adam's state),
in a fresh subprocess (providers.RssMeter), capped at --at-mem-cap-gb; a step that exceeds the cap is
reported as such and not timed (report.py predicts its peak from the largest measured window of that
provider: O(L^2) for official, O(L) for the others).
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import providers as P  # noqa: E402

from fod_kernels.models import AnomalyTransformer, anomaly_transformer_loss  # noqa: E402

CONFIG = dict(B=4, C=25, d_model=128, n_heads=8, e_layers=3, d_ff=128, k=3.0)
AT_PROVIDERS = ("official", "ours", "linear")


# ----------------------------------------------------------------------------- the three steps

class OfficialFormulation:
    """The official model's tensors (attention materialised) computed from an AnomalyTransformer's modules."""

    def __init__(self, model: AnomalyTransformer, L: int):
        self.model = model
        i = torch.arange(L, dtype=torch.float32)
        # the official AnomalyAttention builds one (win, win) distance table per layer at construction
        self.distances = [(i[:, None] - i[None, :]).abs() for _ in model.encoder.attn_layers]

    def forward(self, x):
        m = self.model
        B, L, _ = x.shape
        h = m.embedding(x)
        series_list, prior_list = [], []
        for layer, dist in zip(m.encoder.attn_layers, self.distances):
            a = layer.attention
            H = a.n_heads
            q = a.query_projection(h).view(B, L, H, -1)
            k = a.key_projection(h).view(B, L, H, -1)
            v = a.value_projection(h).view(B, L, H, -1)
            z = a.sigma_projection(h).view(B, L, H).transpose(1, 2)
            attn = torch.einsum("blhe,bshe->bhls", q, k) * (1.0 / math.sqrt(q.shape[-1]))
            sigma = (torch.pow(3, torch.sigmoid(z * 5) + 1e-5) - 1).unsqueeze(-1).repeat(1, 1, 1, L)
            d = dist[:L, :L].unsqueeze(0).unsqueeze(0).repeat(B, H, 1, 1)
            prior = 1.0 / (math.sqrt(2 * math.pi) * sigma) * torch.exp(-d ** 2 / 2 / (sigma ** 2))
            series = torch.softmax(attn, dim=-1)
            new = a.out_projection(torch.einsum("bhls,bshd->blhd", series, v).reshape(B, L, -1))
            h = _feed_forward(layer, h, new)
            series_list.append(series)
            prior_list.append(prior)
        return m.projection(m.encoder.norm(h)), series_list, prior_list

    def step(self, x, opt, k):
        opt.zero_grad()
        out, series, prior = self.forward(x)
        L = x.shape[1]

        def kl(p, q):  # mean over heads of the row sums, (B, L)
            return torch.mean(torch.sum(p * (torch.log(p + 1e-4) - torch.log(q + 1e-4)), dim=-1), dim=1)

        def norm(pr):  # re-evaluated at each use, as the official solver does
            return pr / torch.unsqueeze(torch.sum(pr, dim=-1), dim=-1).repeat(1, 1, 1, L)

        s_loss = p_loss = 0.0
        for s, pr in zip(series, prior):
            s_loss = s_loss + torch.mean(kl(s, norm(pr).detach())) + torch.mean(kl(norm(pr).detach(), s))
            p_loss = p_loss + torch.mean(kl(norm(pr), s.detach())) + torch.mean(kl(s.detach(), norm(pr)))
        s_loss, p_loss = s_loss / len(prior), p_loss / len(prior)
        rec = F.mse_loss(out, x)
        (rec - k * s_loss).backward(retain_graph=True)
        (rec + k * p_loss).backward()
        opt.step()


def _feed_forward(layer, x, new_x):
    x = layer.norm1(x + layer.dropout(new_x))
    y = layer.dropout(layer.activation(layer.conv1(x.transpose(1, 2))))
    y = layer.dropout(layer.conv2(y).transpose(1, 2))
    return layer.norm2(x + y)


def ours_step(model, x, opt, k):
    opt.zero_grad()
    out, stats = model(x)
    anomaly_transformer_loss(x, out, stats, k=k).backward()
    opt.step()


def linear_step(model, x, opt, k):
    """Everything of our step but the operator: each layer's attention output is its values."""
    opt.zero_grad()
    h = model.embedding(x)
    for layer in model.encoder.attn_layers:
        a = layer.attention
        h = _feed_forward(layer, h, a.out_projection(a.value_projection(h)))
    out = model.projection(model.encoder.norm(h))
    (2 * F.mse_loss(out, x)).backward()
    opt.step()


def make_step(provider, L, seed=0, dtype=torch.float32, lr=1e-4):
    """(step, warm_up, model) at window L for a provider: step() runs one training step; warm_up() one on the first
    16 time steps of the same model and optimiser (Adam's state, thread pools) at a negligible cost."""
    torch.manual_seed(seed)
    c = CONFIG
    model = AnomalyTransformer(L, c["C"], c["C"], d_model=c["d_model"], n_heads=c["n_heads"],
                               e_layers=c["e_layers"], d_ff=c["d_ff"]).to(dtype)
    x = torch.randn(c["B"], L, c["C"], dtype=dtype)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if provider == "official":
        off = OfficialFormulation(model, L)
        fn = off.step
    elif provider == "ours":
        fn = partial(ours_step, model)
    elif provider == "linear":
        fn = partial(linear_step, model)
    else:
            raise ValueError(f"unknown provider {provider!r}; choose one of {AT_PROVIDERS}")
    return (lambda: fn(x, opt, c["k"])), (lambda: fn(x[:, :16], opt, c["k"])), model


def test_official_formulation_matches_ours():
    """The benchmark compares equal computations (skipped under --benchmark-only, like test_bench_sanity): the
    official formulation's two backward passes give the gradients of our one backward, in float64."""
    grads = {}
    for provider in ("official", "ours"):
        step, _, model = make_step(provider, 24, dtype=torch.float64, lr=0.0)
        step()
        grads[provider] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads["official"]) == set(grads["ours"])
    for n, g in grads["official"].items():
        assert torch.allclose(g, grads["ours"][n], rtol=1e-9, atol=1e-12), n


# ----------------------------------------------------------------------------- memory (subprocess worker)

def _memprobe(spec):
    step, warm_up, _ = make_step(spec["provider"], spec["L"])
    vm = P._proc_status()["VmSize"]
    resource.setrlimit(resource.RLIMIT_AS, (vm + int(spec["cap_bytes"]), resource.getrlimit(resource.RLIMIT_AS)[1]))
    meter = P.RssMeter()
    try:
        warm_up()
        meter.start()
        t0 = time.perf_counter()
        step()
        one = time.perf_counter() - t0
    except Exception as exc:
        if P._is_oom(exc):
            return {"status": "oom", "error": f"{type(exc).__name__}: {str(exc)[:160]}"}
        raise
    return {"status": "ok", "peak_bytes": int(meter.peak()), "probe_step_s": one}


_MEM = {}


def memory(provider, L, cap_bytes):
    key = (provider, L)
    if key not in _MEM:
        spec = {"provider": provider, "L": L, "cap_bytes": cap_bytes}
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", FOD_KERNELS_QUIET="1",
                   FOD_BENCH_THREADS=str(torch.get_num_threads()))
        import subprocess
        p = subprocess.run([sys.executable, str(Path(__file__).resolve()), json.dumps(spec)], capture_output=True,
                           text=True, env=env, cwd=str(P.ROOT), timeout=3600)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        _MEM[key] = json.loads(lines[-1]) if p.returncode == 0 and lines else \
            {"status": "crash", "error": f"exit {p.returncode}: {(p.stderr or p.stdout).strip()[-300:]}"}
    return _MEM[key]


# ----------------------------------------------------------------------------- the benchmark

def pytest_generate_tests(metafunc):
    if "at_case" in metafunc.fixturenames:
        windows = [int(w) for w in metafunc.config.getoption("--at-windows").split(",") if w.strip()]
        cases = [dict(provider=p, L=L) for L in windows for p in AT_PROVIDERS]
        metafunc.parametrize("at_case", cases, ids=[f"{c['provider']}-L{c['L']}" for c in cases])


def test_anomaly_transformer_step(benchmark, fod_session, at_case):
    if torch.cuda.is_available() and fod_session.config.getoption("--fod-device") != "cpu":
        pytest.skip("the CPU rows of issue 22; the GPU rows belong to the GPU check")
    provider, L = at_case["provider"], at_case["L"]
    cap = int(fod_session.config.getoption("--at-mem-cap-gb") * 2**30)
    extra = {}
    if not fod_session.config.getoption("--fod-no-mem"):
        mem = memory(provider, L, cap)
        if mem["status"] != "ok":
            # not timed; a single empty round puts the row (status, cap, predicted peak) into the JSON
            benchmark.group = f"anomaly transformer train step L{L}"
            benchmark.pedantic(lambda: None, rounds=1, iterations=1)
            benchmark.extra_info.update(dict(kind="anomaly_transformer", provider=provider, L=L, device="cpu",
                                             dtype="float32", median_s=None, iqr_s=None, **CONFIG,
                                             mem_status=mem["status"], mem_error=mem.get("error"), cap_bytes=cap))
            return
        extra["peak_bytes"] = mem["peak_bytes"]
    step, warm_up, _ = make_step(provider, L)
    warm_up()
    one = _MEM.get((provider, L), {}).get("probe_step_s")
    if one is None:  # no memory probe (--fod-no-mem): time one step to size the rounds
        t0 = time.perf_counter()
        step()
        one = time.perf_counter() - t0
    budget, rmin, rmax = fod_session.timing("cpu")
    rounds = max(rmin, min(rmax, int(budget / max(one, 1e-6))))
    benchmark.group = f"anomaly transformer train step L{L}"
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    st = benchmark.stats.stats
    benchmark.extra_info.update(dict(kind="anomaly_transformer", provider=provider, L=L, device="cpu",
                                     dtype="float32", rounds=rounds, median_s=st.median, iqr_s=st.iqr,
                                     min_s=st.min, max_s=st.max, threads=torch.get_num_threads(), **CONFIG,
                                     **extra))


if __name__ == "__main__":
    if os.environ.get("FOD_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["FOD_BENCH_THREADS"]))
    print(json.dumps(_memprobe(json.loads(sys.argv[1]))), flush=True)
