"""The full FOD model (fod.model.FOD: wide_resnet50_2 levels layer2 + layer3, 3 layers per level):
one training step (both levels' losses, one backward, one Adam step) and one scoring pass
(anomaly maps), each with the backbone excluded (cached features, as training with
cache_features) and included (images in), per fod_kernels backend.

The backbone is randomly initialised (weights do not change the cost, and this machine may have no
network); the reference memories are random. Batch: 1 on CPU, 8 on CUDA (--fod-model-batch).
Skipped with the import error when the ``fod`` package is not importable. Runs by default with
CUDA; on CPU only with ``--fod-model`` (it takes about 6 minutes on a 2-core machine).
"""
from __future__ import annotations

import time
import warnings

import pytest
import torch
import torch.nn.functional as F

import providers as P

WHATS = ("train step, backbone excluded", "train step, backbone included",
         "scoring, backbone excluded", "scoring, backbone included")


def pytest_generate_tests(metafunc):
    if "model_case" in metafunc.fixturenames:
        cfg = metafunc.config
        cases = []
        devices = ["cuda" if torch.cuda.is_available() else "cpu"] if cfg.getoption("--fod-device") == "auto" \
            else [d for d in cfg.getoption("--fod-device").split(",") if d]
        wanted = cfg.getoption("--fod-model")
        for device in devices:
            if wanted is False or (wanted is None and device == "cpu"):
                continue  # on CPU opt-in (--fod-model): one reference training step takes ~20 s here
            for backend in P.KERNEL_BACKENDS:
                if backend in cfg.getoption("--fod-providers").split(","):
                    cases += [dict(provider=backend, device=device, what=what) for what in WHATS]
        metafunc.parametrize("model_case", cases,
                             ids=[f"{c['provider']}-{c['what'].replace(', ', '-').replace(' ', '_')}-{c['device']}"
                                  for c in cases])


_MODELS = {}


def _build(device, batch):
    key = (device, batch)
    if key not in _MODELS:
        _MODELS.clear()
        from fod.backbone import build_backbone
        from fod.config import Config
        from fod.model import FOD
        cfg = Config(pretrained=False, device=device, batch_size=batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            backbone = build_backbone(cfg)
        grids = backbone.grids(cfg.image_size)
        gen = torch.Generator().manual_seed(0)
        mems = [torch.randn(g[0] * g[1], c, generator=gen) for g, c in zip(grids, backbone.channels)]
        fod = FOD(cfg, backbone, grids, mems).to(device)
        fod.memories = [m.to(device) for m in mems]
        images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=gen).to(device)
        with torch.no_grad():
            feats = fod.tokens(images)
        opt = torch.optim.Adam(fod.models.parameters(), lr=cfg.lr)
        _MODELS[key] = (fod, cfg, images, feats, opt)
    return _MODELS[key]


def _train_step(fod, cfg, opt, feats):
    from fod.model import fod_loss
    loss = 0.0
    for f, model, mem in zip(feats, fod.models, fod.memories):
        o, intra, inter = model(f, mem)
        loss = loss + fod_loss(o.float(), f, intra, inter, cfg.lambda1, cfg.lambda2)[0]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


@torch.no_grad()
def _score(fod, feats, size):
    """FOD.anomaly_maps without the backbone: same per-level scoring from given features."""
    from fod.model import token_scores
    maps = []
    for feat, model, mem, g in zip(feats, fod.models, fod.memories, fod.grids):
        out, _, inter = model(feat, mem, need_stats=(False, True))
        s = token_scores(out, feat, inter).view(-1, 1, *g)
        maps.append(F.interpolate(s, size=size, mode="bilinear", align_corners=True)[:, 0])
    return torch.stack(maps).mean(0)


def test_model(benchmark, fod_session, model_case):
    try:
        import fod.model  # noqa: F401
    except Exception as exc:
        pytest.skip(f"the fod package is not importable yet: {type(exc).__name__}: {exc}")
    name, device, what = model_case["provider"], model_case["device"], model_case["what"]
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ok, why = fod_session.provider(name).availability(device, torch.float32)
    if not ok:
        pytest.skip(f"{name}: {why}")
    batch = fod_session.config.getoption("--fod-model-batch") or (8 if device == "cuda" else 1)
    fod, cfg, images, feats, opt = _build(device, batch)
    fod.set_backend(name)
    size = images.shape[-2:]
    if what.startswith("train"):
        fod.models.train()
        if "excluded" in what:
            def target():
                _train_step(fod, cfg, opt, feats)
        else:
            def target():
                _train_step(fod, cfg, opt, fod.tokens(images))
    else:
        fod.models.eval()
        if "excluded" in what:
            def target():
                return _score(fod, feats, size)
        else:
            def target():
                return fod.anomaly_maps(images)

    def timed():
        r = target()
        P.sync(device)
        return r

    t0 = time.perf_counter()
    timed()  # warm-up (Adam state, lazy init)
    one = time.perf_counter() - t0
    extra = {}
    if device == "cuda":
        meter = P.CudaMeter(torch.device(device))
        meter.start()
        timed()
        extra["peak_bytes"] = int(meter.peak())
    budget, rmin, rmax = fod_session.timing(device)
    rounds = max(rmin, min(rmax, int(budget / max(one, 1e-6))))
    benchmark.group = f"model {what} B{batch} {device}"
    benchmark.pedantic(timed, rounds=rounds, iterations=1)
    st = benchmark.stats.stats
    benchmark.extra_info.update(dict(kind="model", provider=name, device=device, what=what, B=batch,
                                     dtype="float32", rounds=rounds, median_s=st.median, iqr_s=st.iqr,
                                     min_s=st.min, max_s=st.max, grids=[list(g) for g in fod.grids],
                                     d_models=fod.d_models, **extra))
