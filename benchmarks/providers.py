"""What the benchmarks time: providers of one FOD I2Correlation layer, side by side.

A provider computes both correlation branches of one layer (intra: q, k, v
from the image; inter: k, v from a batch-1 reference memory) and the FOD
losses on them. Every provider has three entry points:

``fwd(inp) -> state``   forward as in training (graph built, losses assembled);
``bwd(state)``          the backward pass(es) of that forward;
``infer(inp)``          scoring: both outputs and the inter branch's K, no grad.

Providers:

- the project's backends (``reference``, ``cpu``, ``triton``, ``cuda``) through
  ``fod_kernels.i2correlation``: one fused call, one scalar loss, one backward;
- ``official``: the public FOD code's way, from the published formulas
  (spec section 6): distance maps and sigmas repeated to (B, H, L, L), the
  prior 1/(2 pi sy sx) exp(-dy^2/(2 sy^2) - dx^2/(2 sx^2)) normalised by its
  (repeated) row sum afterwards, the attention softmax materialised, the
  reference memory tiled to the batch, KL and entropy on the materialised
  matrices with eps 1e-4, and two backward passes (loss 1 with the attention
  detached, loss 2 with the prior detached);
- ``compile``: ``torch.compile`` of the spec-exact reference (same losses as the
  backends); compilation happens in the warm-up, outside the timing;
- ``sdpa``: the lower bound, two ``scaled_dot_product_attention`` calls
  (intra + inter) and no statistics.

Run as a script it is the subprocess worker of the benchmarks:
``python benchmarks/providers.py memprobe '<json>'`` measures peak memory of
each mode in a fresh process (CPU: growth of the resident set, see
``RssMeter``), and ``oomtrial`` runs one training step under a memory cap.
"""
from __future__ import annotations

import gc
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
try:
    import fod_kernels  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(ROOT))
import fod_kernels as fk  # noqa: E402
from fod_kernels import correlation_reference  # noqa: E402

H = 8
# FOD's two feature levels: layer2 (32x32 tokens, d_model 256) and layer3 (16x16, d_model 512), 8 heads.
LEVELS = {"l2": (1024, 32), "l3": (256, 64)}
MODES = ("forward", "backward", "fwd+bwd", "infer")
KERNEL_BACKENDS = ("reference", "cpu", "triton", "cuda")
PROVIDERS = KERNEL_BACKENDS + ("official", "compile", "sdpa")
MATERIALISING = ("reference", "official", "compile")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
LAMBDA1 = LAMBDA2 = 0.5
OFFICIAL_EPS = 1e-4

# FLOP convention (as FlashAttention's benchmarks): a forward is 4*B*H*L*S*D per branch (QK^T and PV),
# a backward 2.5x that, forward+backward 3.5x. Two branches per layer. Statistics are not counted.
FLOP_FACTOR = {"forward": 1.0, "infer": 1.0, "backward": 2.5, "fwd+bwd": 3.5}


def flops(mode: str, B: int, H: int, L: int, D: int, branches: int = 2) -> float:
    return FLOP_FACTOR[mode] * branches * 4.0 * B * H * L * L * D


def grid_for(L: int) -> tuple[int, int]:
    """A near-square grid (rows <= cols) with rows * cols = L."""
    r = int(math.isqrt(L))
    while L % r:
        r -= 1
    return r, L // r


# ----------------------------------------------------------------------------- inputs

@dataclass
class Inputs:
    B: int
    L: int
    D: int
    dtype: torch.dtype
    device: torch.device
    grid: tuple
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    sigma: torch.Tensor
    q_ref: torch.Tensor
    k_ref: torch.Tensor
    v_ref: torch.Tensor
    sigma_ref: torch.Tensor
    g: torch.Tensor  # fixed upstream weights standing in for the reconstruction loss
    cache: dict = field(default_factory=dict)

    @property
    def leaves(self):
        return (self.q, self.k, self.v, self.sigma, self.q_ref, self.k_ref, self.v_ref, self.sigma_ref)

    def zero_grads(self):
        for t in self.leaves:
            t.grad = None


def make_inputs(B, L, D, dtype=torch.float32, device="cpu", grid=None, seed=0, heads=H) -> Inputs:
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape, lo=None, hi=None):
        if lo is None:
            t = torch.randn(*shape, generator=gen)
        else:
            t = lo + (hi - lo) * torch.rand(*shape, generator=gen)
        return t.to(device=device, dtype=dtype).requires_grad_()

    grid = tuple(grid or grid_for(L))
    return Inputs(B=B, L=L, D=D, dtype=dtype, device=device, grid=grid,
                  q=leaf(B, heads, L, D), k=leaf(B, heads, L, D), v=leaf(B, heads, L, D),
                  sigma=leaf(B, heads, L, 2, lo=0.3, hi=2.0),
                  q_ref=leaf(B, heads, L, D), k_ref=leaf(1, heads, L, D), v_ref=leaf(1, heads, L, D),
                  sigma_ref=leaf(B, heads, L, 2, lo=0.3, hi=2.0),
                  g=torch.randn(B, heads, L, D, generator=gen).to(device=device, dtype=dtype))


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _mean32(x):
    """Mean accumulated in at least float32 (bfloat16 outputs), float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32)).mean()


def fod_loss(oi, oe, kai, kpi, ei, kae, kpe, ee, g):
    """The FOD objective of one layer as ONE scalar (spec sections 2 and 5): both official
    backward passes summed, so the reconstruction term counts twice."""
    rec = _mean32((oi - oe) * g)
    loss1 = LAMBDA1 * (kpi.mean() - kpe.mean())  # reaches sigma only
    loss2 = -LAMBDA1 * kai.mean() - LAMBDA2 * ei.mean() + LAMBDA1 * kae.mean() + LAMBDA2 * ee.mean()  # q, k only
    return 2 * rec + loss1 + loss2


# ----------------------------------------------------------------------------- providers

class KernelProvider:
    """A fod_kernels backend through the public fused API (input value checks off: they sync)."""

    def __init__(self, backend):
        self.name = backend
        self._probe = {}

    def availability(self, device, dtype):
        device = torch.device(device)
        st = fk.available_backends()[self.name]
        if not st.available:
            return False, st.reason
        if self.name == "triton" and device.type == "cpu":
            return False, ("triton on CPU runs only under TRITON_INTERPRET=1 (the interpreter), "
                           "far too slow to benchmark")
        key = (device.type, dtype)
        if key not in self._probe:
            self._probe[key] = _probe_call(self, device, dtype)
        return self._probe[key]

    def fwd(self, inp):
        oi, oe, si, se = fk.i2correlation(inp.q, inp.k, inp.v, inp.sigma, inp.q_ref, inp.k_ref, inp.v_ref,
                                          inp.sigma_ref, inp.grid, backend=self.name, check_values=False)
        return fod_loss(oi, oe, *si, *se, inp.g)

    def bwd(self, loss):
        loss.backward()

    def infer(self, inp):
        oi, oe, _, se = fk.i2correlation(inp.q, inp.k, inp.v, inp.sigma, inp.q_ref, inp.k_ref, inp.v_ref,
                                         inp.sigma_ref, inp.grid, backend=self.name, need_stats=(False, True),
                                         check_values=False)
        return oi, oe, se.kl_attn


def _probe_call(provider, device, dtype):
    """Run a tiny forward+backward and inference: a backend that rejects this dtype/device says why."""
    try:
        inp = make_inputs(1, 4, 8, dtype, device, grid=(2, 2), heads=1)
        provider.bwd(provider.fwd(inp))
        with torch.no_grad():
            provider.infer(inp)
        sync(device)
    except Exception as exc:  # the reason is reported verbatim in the skip
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return False, (f"{provider.name} fails on {dtype} {torch.device(device).type} tensors: "
                       f"{type(exc).__name__}: {msg}")
    return True, ""


class OfficialProvider:
    """The public FOD code's computation of one layer's correlations, from the published formulas."""

    name = "official"

    def availability(self, device, dtype):
        return True, ""

    @staticmethod
    def _dist(inp):
        # The official code loads precomputed squared-distance maps (L, L) per axis: made once, not timed.
        if "dist" not in inp.cache:
            rows, cols = inp.grid
            idx = torch.arange(inp.L, device=inp.device)
            r, c = (idx // cols).to(inp.dtype), (idx % cols).to(inp.dtype)
            inp.cache["dist"] = ((r[:, None] - r[None, :]) ** 2, (c[:, None] - c[None, :]) ** 2)
        return inp.cache["dist"]

    @staticmethod
    def _branch(q, k, v, sigma, dist):
        B, Hh, L, D = q.shape
        if k.shape[0] != B:  # the reference memory is tiled to the batch size
            k, v = k.repeat(B, 1, 1, 1), v.repeat(B, 1, 1, 1)
        attn = torch.softmax(D ** -0.5 * torch.matmul(q, k.transpose(-1, -2)), dim=-1)
        out = torch.matmul(attn, v)
        s1 = sigma[..., 0].unsqueeze(-1).repeat(1, 1, 1, L)
        s2 = sigma[..., 1].unsqueeze(-1).repeat(1, 1, 1, L)
        dy = dist[0].unsqueeze(0).unsqueeze(0).repeat(B, Hh, 1, 1)
        dx = dist[1].unsqueeze(0).unsqueeze(0).repeat(B, Hh, 1, 1)
        prior = 1.0 / (2 * math.pi * s1 * s2) * torch.exp(-dy / (2 * s1 ** 2) - dx / (2 * s2 ** 2))
        prior = prior / torch.unsqueeze(torch.sum(prior, dim=-1), dim=-1).repeat(1, 1, 1, L)
        return out, attn, prior

    @staticmethod
    def kl(p, q):  # (B, H, L, L) -> (B, L), mean over heads as the official losses
        return torch.mean(torch.sum(p * (torch.log(p + OFFICIAL_EPS) - torch.log(q + OFFICIAL_EPS)), dim=-1), dim=1)

    @staticmethod
    def entropy(p):
        return torch.mean(torch.sum(-p * torch.log(p + OFFICIAL_EPS), dim=-1), dim=1)

    def fwd(self, inp):
        dist = self._dist(inp)
        oi, ai, ti = self._branch(inp.q, inp.k, inp.v, inp.sigma, dist)
        oe, ae, te = self._branch(inp.q_ref, inp.k_ref, inp.v_ref, inp.sigma_ref, dist)
        kl, ent = self.kl, self.entropy
        rec = _mean32((oi - oe) * inp.g)
        series_i = kl(ai, ti.detach()) + kl(ti.detach(), ai)
        series_e = kl(ae, te.detach()) + kl(te.detach(), ae)
        prior_i = kl(ti, ai.detach()) + kl(ai.detach(), ti)
        prior_e = kl(te, ae.detach()) + kl(ae.detach(), te)
        loss1 = rec + LAMBDA1 * (prior_i.mean() - prior_e.mean())
        loss2 = (rec - LAMBDA1 * series_i.mean() - LAMBDA2 * ent(ai).mean()
                 + LAMBDA1 * series_e.mean() + LAMBDA2 * ent(ae).mean())
        return loss1, loss2

    def bwd(self, state):
        loss1, loss2 = state
        loss1.backward(retain_graph=True)
        loss2.backward()

    def infer(self, inp):
        dist = self._dist(inp)
        oi, _, _ = self._branch(inp.q, inp.k, inp.v, inp.sigma, dist)  # the official model builds both priors
        oe, ae, te = self._branch(inp.q_ref, inp.k_ref, inp.v_ref, inp.sigma_ref, dist)
        return oi, oe, self.kl(ae, te) + self.kl(te, ae)


def _ref_train(q, k, v, sigma, q_ref, k_ref, v_ref, sigma_ref, g, grid):
    oi, kai, kpi, ei = correlation_reference(q, k, v, sigma, grid)
    oe, kae, kpe, ee = correlation_reference(q_ref, k_ref, v_ref, sigma_ref, grid)
    return fod_loss(oi, oe, kai, kpi, ei, kae, kpe, ee, g)


def _ref_infer(q, k, v, sigma, q_ref, k_ref, v_ref, sigma_ref, grid):
    oi = correlation_reference(q, k, v, sigma, grid)[0]
    oe, kae, _, _ = correlation_reference(q_ref, k_ref, v_ref, sigma_ref, grid)
    return oi, oe, kae


class CompileProvider:
    """torch.compile of the spec-exact reference, specialised per shape (dynamic=False)."""

    name = "compile"

    def __init__(self):
        self._train = self._infer = None
        self._probe = {}

    def _fns(self):
        if self._train is None:
            import torch._dynamo as dynamo
            for knob in ("recompile_limit", "cache_size_limit"):  # one graph per shape and dtype
                if hasattr(dynamo.config, knob):
                    setattr(dynamo.config, knob, 256)
            self._train = torch.compile(_ref_train, dynamic=False)
            self._infer = torch.compile(_ref_infer, dynamic=False)
        return self._train, self._infer

    def availability(self, device, dtype):
        if not hasattr(torch, "compile"):
            return False, "torch.compile does not exist in this torch"
        key = (torch.device(device).type, dtype)
        if key not in self._probe:
            try:
                self._fns()
            except Exception as exc:
                self._probe[key] = (False, f"torch.compile unavailable: {type(exc).__name__}: {exc}")
            else:
                ok, why = _probe_call(self, device, dtype)
                self._probe[key] = (ok, why.replace("compile fails", "torch.compile of the reference fails"))
        return self._probe[key]

    def fwd(self, inp):
        return self._fns()[0](*inp.leaves, inp.g, inp.grid)

    def bwd(self, loss):
        loss.backward()

    def infer(self, inp):
        return self._fns()[1](*inp.leaves, inp.grid)


class SdpaProvider:
    """Lower bound: two fused attentions (intra + inter), no prior, no statistics."""

    name = "sdpa"

    def availability(self, device, dtype):
        if not hasattr(F, "scaled_dot_product_attention"):
            return False, "torch.nn.functional.scaled_dot_product_attention missing"
        return True, ""

    def _outs(self, inp):
        B = inp.B
        oi = F.scaled_dot_product_attention(inp.q, inp.k, inp.v)
        oe = F.scaled_dot_product_attention(inp.q_ref, inp.k_ref.expand(B, -1, -1, -1),
                                            inp.v_ref.expand(B, -1, -1, -1))
        return oi, oe

    def fwd(self, inp):
        oi, oe = self._outs(inp)
        return _mean32((oi - oe) * inp.g)

    def bwd(self, loss):
        loss.backward()

    def infer(self, inp):
        return self._outs(inp)


def make_provider(name):
    if name in KERNEL_BACKENDS:
        return KernelProvider(name)
    return {"official": OfficialProvider, "compile": CompileProvider, "sdpa": SdpaProvider}[name]()


# ----------------------------------------------------------------------------- one mode, as a callable

def mode_callables(provider, mode, inp):
    """(target, setup) for pytest-benchmark's pedantic mode; each call synchronises the device."""
    dev = inp.device

    if mode == "forward":
        def target():
            st = provider.fwd(inp)
            sync(dev)
            return st  # freed outside the timed region
        return target, None
    if mode == "backward":
        def setup():
            inp.zero_grads()
            st = provider.fwd(inp)
            sync(dev)
            return (st,), {}

        def target(st):
            provider.bwd(st)
            sync(dev)
        return target, setup
    if mode == "fwd+bwd":
        def setup():
            inp.zero_grads()

        def target():
            provider.bwd(provider.fwd(inp))
            sync(dev)
        return target, setup
    if mode == "infer":
        def target():
            with torch.no_grad():
                res = provider.infer(inp)
            sync(dev)
            return res
        return target, None
    raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")


def run_once(provider, mode, inp):
    target, setup = mode_callables(provider, mode, inp)
    args = setup() if setup else None
    return target(*args[0]) if args else target()


def warm_up(provider, mode, inp):
    """Lazy initialisation (thread pools, kernels, allocator) before anything is measured.
    torch.compile specialises on the shape, so it warms up (compiles) at the real shape; the
    eager providers on a tiny input of the same dtype and device, which costs nothing."""
    if isinstance(provider, CompileProvider) or inp.device.type == "cuda":
        run_once(provider, mode, inp)
    else:
        run_once(provider, mode, make_inputs(1, 16, inp.D, inp.dtype, inp.device, grid=(4, 4)))


# ----------------------------------------------------------------------------- memory

def _proc_status():
    return {k: int(v) * 1024 for k, v in re.findall(r"(\w+):\s+(\d+) kB", Path("/proc/self/status").read_text())}


class RssMeter:
    """CPU peak memory as growth of the resident set of this (fresh, single-purpose) process.

    The kernel's high-water mark VmHWM is reset by writing 5 to /proc/self/clear_refs;
    peak = VmHWM after the operation - VmRSS before it. The worker runs with
    MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB so that glibc serves every tensor with mmap
    and returns it on free: freed memory cannot hide later growth, and nothing is
    counted twice. Torch's CPU allocator does not cache, so RSS growth is allocation."""

    def __init__(self):
        self.base = 0

    def start(self):
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")
        self.base = _proc_status()["VmRSS"]

    def peak(self):
        return _proc_status()["VmHWM"] - self.base

    def current(self):
        return _proc_status()["VmRSS"] - self.base


class CudaMeter:
    """CUDA peak memory from the caching allocator's own counters (exact, in-process)."""

    def __init__(self, device):
        self.device, self.base = device, 0

    def start(self):
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def peak(self):
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.base

    def current(self):
        return torch.cuda.memory_allocated(self.device) - self.base


def measure_modes(provider, modes, inp, meter):
    """Peak bytes above the inputs (and, for 'backward', above the saved forward state) per mode,
    plus for 'forward' the bytes still held afterwards (what the backward will need)."""
    res = {}
    for mode in modes:
        warm_up(provider, mode, inp)
        inp.zero_grads()
        target, setup = mode_callables(provider, mode, inp)
        args = setup()[0] if setup and mode == "backward" else ()
        if setup and mode != "backward":
            setup()
        meter.start()
        t0 = time.perf_counter()
        out = target(*args)
        rec = {"peak_bytes": int(meter.peak()), "probe_call_s": time.perf_counter() - t0}
        if mode == "forward":
            rec["retained_bytes"] = int(meter.current())
        del out, args
        inp.zero_grads()
        res[mode] = rec
    return res


def memprobe_subprocess(provider, B, L, D, dtype, modes, grid=None, timeout=900):
    """Measure CPU peak memory of each mode in a fresh process. Returns {mode: {...}} or {'error': ...}."""
    spec = {"provider": provider, "B": B, "L": L, "D": D, "dtype": str(dtype).replace("torch.", ""),
            "modes": list(modes), "grid": list(grid or grid_for(L))}
    return _worker(["memprobe", json.dumps(spec)], timeout)


def _worker(args, timeout, extra_env=None):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", FOD_KERNELS_QUIET="1",
               FOD_BENCH_THREADS=str(torch.get_num_threads()), **(extra_env or {}))
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, str(Path(__file__).resolve())] + args, capture_output=True, text=True,
                           timeout=timeout, env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s", "status": "timeout", "wall_s": time.perf_counter() - t0}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode == 0 and lines:
        res = json.loads(lines[-1])
        res.setdefault("wall_s", time.perf_counter() - t0)
        return res
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return {"error": f"worker exit {p.returncode}: {' | '.join(tail)}", "status": "crash",
            "wall_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- out-of-memory boundary

def _is_oom(exc):
    text = f"{type(exc).__name__}: {exc}".lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text \
        or "cannot allocate memory" in text or "failed to allocate" in text


def oom_trial_subprocess(provider, B, L, D, device, cap_bytes, timeout):
    """One forward+backward at (B, 8, L, D) float32 in a fresh process whose memory is capped
    (CPU: RLIMIT_AS = address space after set-up + cap; CUDA: the device's own memory).
    Returns {'status': 'ok'|'oom'|'timeout'|'crash', 'peak_bytes', 'wall_s', ...}."""
    spec = {"provider": provider, "B": B, "L": L, "D": D, "device": device, "cap_bytes": cap_bytes}
    return _worker(["oomtrial", json.dumps(spec)], timeout)


def _oomtrial(spec):
    device = torch.device(spec["device"])
    prov = make_provider(spec["provider"])
    ok, why = prov.availability(device, torch.float32)
    if not ok:
        return {"status": "unavailable", "error": why}
    inp = make_inputs(spec["B"], spec["L"], spec["D"], torch.float32, device)
    meter = CudaMeter(device) if device.type == "cuda" else RssMeter()
    if device.type == "cpu":
        vm = _proc_status()["VmSize"]
        lim = vm + int(spec["cap_bytes"])
        resource.setrlimit(resource.RLIMIT_AS, (lim, resource.getrlimit(resource.RLIMIT_AS)[1]))
    t0 = time.perf_counter()
    meter.start()
    try:
        provider_out = prov.fwd(inp)
        prov.bwd(provider_out)
        sync(device)
        del provider_out
    except Exception as exc:
        if _is_oom(exc):
            return {"status": "oom", "error": f"{type(exc).__name__}: {str(exc)[:200]}",
                    "seconds": time.perf_counter() - t0}
        raise
    return {"status": "ok", "peak_bytes": int(meter.peak()), "seconds": time.perf_counter() - t0}


def _memprobe(spec):
    dtype = DTYPES[spec["dtype"]]
    prov = make_provider(spec["provider"])
    ok, why = prov.availability("cpu", dtype)
    if not ok:
        return {"error": why, "status": "unavailable"}
    inp = make_inputs(spec["B"], spec["L"], spec["D"], dtype, "cpu", grid=tuple(spec["grid"]))
    return {"modes": measure_modes(prov, spec["modes"], inp, RssMeter())}


if __name__ == "__main__":
    if os.environ.get("FOD_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["FOD_BENCH_THREADS"]))
    cmd, arg = sys.argv[1], json.loads(sys.argv[2])
    result = {"memprobe": _memprobe, "oomtrial": _oomtrial}[cmd](arg)
    print(json.dumps(result), flush=True)
