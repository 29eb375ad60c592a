"""fod benchmark (categories, resume, failures, results files), the baselines against direct computations,
the --no-intra / --no-inter ablations, the embedding bias, --compat-official's defaults and the VisA layout."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import helpers

from fod import baselines as BL
from fod import calibrate as CAL
from fod import benchmark as B
from fod import checkpoint as C
from fod.cli import build_parser, main, resolve_config
from fod.config import Config
from fod.data import AnomalyDataset, list_samples
from fod.model import SCORES, LevelModel, fod_loss, rec_score, reconstruction_loss, token_scores
from fod.synthetic import make_dataset
from fod_kernels import I2Correlation, correlation_reference

ROOT = Path(__file__).resolve().parents[2]
TINY = [*helpers.TINY, "--heatmaps", "0"]
NAMES = ["knn", "memory_distance", "rec", "inter", "rec_x_inter"]


def _category(path, seed):
    return make_dataset(path, size=32, n_train=6, n_test_good=2, n_test_defect=1, seed=seed)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """a, b: normal categories; bad: a training image that cannot be read."""
    r = tmp_path_factory.mktemp("bench") / "root"
    for i, c in enumerate("ab"):
        _category(r / c, i)
    _category(r / "bad", 2)
    (r / "bad" / "train" / "good" / "003.png").write_bytes(b"not an image")
    return r


@pytest.fixture(scope="module")
def bench(root, tmp_path_factory):
    """A benchmark of a and bad on two CPU worker processes."""
    out = tmp_path_factory.mktemp("bench") / "out"
    rc = main(["benchmark", "--data", str(root), "--output", str(out), *TINY, "--epochs", "1", "--devices", "cpu,cpu",
               "--categories", "a,bad"])
    return rc, out


def test_results_files_and_a_failed_category(bench, root):
    rc, out = bench
    assert rc == 1  # one category failed
    rows = json.loads((out / "results.json").read_text())
    assert [r["category"] for r in rows] == ["a", "bad", "mean"]
    a, bad, mean = rows
    for r in (a,):
        assert r["status"] == "ok"
        for k in ("image_auroc", "pixel_auroc", "aupro", "train_seconds", "eval_images_per_second"):
            assert isinstance(r[k], float) and r[k] >= 0, (r["category"], k)
        assert list(r["baselines"]) == NAMES
        for n in NAMES:
            assert set(r["baselines"][n]) == {"image_auroc", "pixel_auroc", "aupro"}
            assert all(0 <= v <= 1 for v in r["baselines"][n].values())
        # FOD's own score recomputed by the baselines equals the main result
        assert r["baselines"]["rec_x_inter"] == {k: r[k] for k in ("image_auroc", "pixel_auroc", "aupro")}
        m = json.loads((out / r["category"] / "metrics.json").read_text())
        assert m["image_auroc"] == r["image_auroc"] and m["config"]["data"] == str(root.resolve() / r["category"])
    assert bad["status"] == "failed" and "003.png" in bad["error"] and bad["image_auroc"] is None
    assert "003.png" in (out / "bad" / "error.txt").read_text()
    assert mean["status"] == "partial" and mean["n_categories"] == 1 and mean["failed"] == ["bad"]
    assert mean["image_auroc"] == a["image_auroc"] and mean["baselines"] == a["baselines"]

    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["category"] for t in table] == ["a", "bad", "mean"]
    assert float(table[0]["knn_pixel_auroc"]) == a["baselines"]["knn"]["pixel_auroc"]
    assert float(table[2]["aupro"]) == pytest.approx(mean["aupro"])
    assert table[1]["status"] == "failed" and "003.png" in table[1]["error"] and table[1]["image_auroc"] == ""

    md = (out / "results.md").read_text()
    header = "| category | FOD | " + " | ".join(NAMES) + " |"
    assert md.count(header) == 3  # image AUROC, pixel AUROC, AUPRO
    assert f"| a | {100 * a['image_auroc']:.1f} | " in md and "| bad (FAILED) | – |" in md
    assert "**mean** (1 categories)" in md and "```toml" in md and "Versions: fod" in md
    assert "fod benchmark --data" in md and "## Failed categories" in md
    for k in ("image_auroc", "pixel_auroc", "aupro"):
        png = out / f"results_{k}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and f"]({png.name})" in md


def test_rerun_skips_finished_categories_and_recomputes_baselines_for_new_options(bench, root, capsys):
    rc, out = bench
    before = {r["category"]: r for r in json.loads((out / "results.json").read_text())}
    ck = (out / "a" / "checkpoint.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["benchmark", "--data", str(root), "--output", str(out), *TINY, "--epochs", "1",
                 "--knn-coreset", "0.5", "--categories", "a,bad"]) == 1
    err = capsys.readouterr().err
    assert "a: finished earlier, training skipped" in err
    assert (out / "a" / "checkpoint.pt").stat().st_mtime_ns == ck
    after = {r["category"]: r for r in json.loads((out / "results.json").read_text())}
    for c in "a":
        assert {k: after[c][k] for k in ("image_auroc", "pixel_auroc", "aupro", "train_seconds")} == \
               {k: before[c][k] for k in ("image_auroc", "pixel_auroc", "aupro", "train_seconds")}
        bl = json.loads((out / c / "baselines.json").read_text())
        assert bl["coreset"] == 0.5 and bl["knn_bank"] == [math.ceil(n / 2) for n in bl["knn_bank_full"]]
        assert after[c]["baselines"]["rec"] == before[c]["baselines"]["rec"]
    assert after["bad"]["status"] == "failed"

    # fewer epochs than a finished category was trained for: that category fails, nothing is relabelled
    assert main(["benchmark", "--data", str(root), "--output", str(out), *TINY, "--epochs", "0",
                 "--categories", "a"]) == 1
    assert "trained for 1 epochs, more than --epochs 0" in json.loads((out / "results.json").read_text())[0]["error"]
    assert json.loads((out / "a" / "metrics.json").read_text())["epochs"] == 1
    assert main(["benchmark", "--data", str(root), "--output", str(out), *TINY, "--epochs", "1",
                 "--knn-coreset", "0.5", "--categories", "a"]) == 0 and not (out / "a" / "error.txt").exists()

    # another configuration in the same output folder is refused, naming the difference
    assert main(["benchmark", "--data", str(root), "--output", str(out), *TINY, "--epochs", "1", "--lr", "0.5",
                 "--categories", "a"]) == 2
    assert "lr: saved 0.001, now 0.5" in capsys.readouterr().err


def test_mean_record_leaves_out_failed_categories():
    ok = dict(status="ok", train_seconds=2.0, eval_images_per_second=4.0)
    rows = [{"category": "x", **ok, "image_auroc": 0.5, "pixel_auroc": 0.6, "aupro": 0.2,
             "baselines": {"knn": {"image_auroc": 1.0, "pixel_auroc": 0.9, "aupro": 0.7}}},
            {"category": "y", **ok, "image_auroc": 1.0, "pixel_auroc": 0.8, "aupro": 0.4, "train_seconds": 4.0,
             "baselines": {"knn": {"image_auroc": 0.5, "pixel_auroc": 0.7, "aupro": 0.1}}},
            B._failure("z", Path("z"), "ValueError: broken")]
    m = B.mean_record(rows)
    assert (m["status"], m["n_categories"], m["failed"]) == ("partial", 2, ["z"])
    assert (m["image_auroc"], m["pixel_auroc"], m["aupro"], m["train_seconds"]) == pytest.approx((0.75, 0.7, 0.3, 3))
    assert m["baselines"]["knn"] == pytest.approx({"image_auroc": 0.75, "pixel_auroc": 0.8, "aupro": 0.4})
    assert B.mean_record(rows[:2])["status"] == "ok" and B.mean_record(rows[2:])["status"] == "failed"


def test_parallel_runs_equal_sequential_runs(bench, root, tmp_path, monkeypatch):
    _, out = bench
    seq = tmp_path / "seq"
    # the workers of --devices cpu,cpu ran with one thread each: so does this run (sums over 2 threads differ in the
    # last bits, and one swapped pair of pixels moves the pixel AUROC here by 5.6e-6)
    monkeypatch.setenv("FOD_THREADS", "1")
    threads = torch.get_num_threads()
    try:
        assert main(["benchmark", "--data", str(root), "--output", str(seq), *TINY, "--epochs", "1",
                     "--categories", "a"]) == 0
    finally:
        torch.set_num_threads(threads)
    par = {r["category"]: r for r in json.loads((out / "results.json").read_text())}
    rows = json.loads((seq / "results.json").read_text())
    assert [r["category"] for r in rows] == ["a", "mean"] and rows[-1]["status"] == "ok"
    for r in rows[:1]:
        for k in ("image_auroc", "pixel_auroc", "aupro"):
            assert r[k] == pytest.approx(par[r["category"]][k], abs=1e-6)
            for n in ("memory_distance", "inter"):  # (knn: the test above may have changed its coreset)
                assert r["baselines"][n][k] == pytest.approx(par[r["category"]]["baselines"][n][k], abs=1e-6)


def test_resume_after_kill(root, tmp_path, capsys):
    out = tmp_path / "out"
    epochs = 8
    cmd = [sys.executable, "-m", "fod", "benchmark", "--data", str(root), "--output", str(out), *TINY,
           "--epochs", str(epochs), "--categories", "b"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FOD_THREADS": "1"}
    with open(tmp_path / "log", "w") as log:
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 600
        while not (out / "b" / "checkpoint.pt").exists():
            assert p.poll() is None, (tmp_path / "log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not (out / "b" / "metrics.json").exists()  # killed while training
    killed_at = C.load_raw(out / "b" / "checkpoint.pt")["epoch"]
    capsys.readouterr()
    assert main(cmd[3:]) == 0  # the same command again, in this process
    err = capsys.readouterr().err
    assert "b: resuming from its checkpoint" in err
    assert f"resuming {out / 'b' / 'checkpoint.pt'} after epoch {killed_at}" in err
    ck = C.load_raw(out / "b" / "checkpoint.pt")
    assert ck["epoch"] == epochs and [h["epoch"] for h in ck["history"]] == list(range(1, epochs + 1))
    rows = json.loads((out / "results.json").read_text())
    assert [(x["category"], x["status"]) for x in rows] == [("b", "ok"), ("mean", "ok")]


# ----------------------------------------------------------------------------- baselines

@pytest.mark.parametrize("seed", range(3))
def test_nn_distance_matches_sklearn(seed):
    from sklearn.neighbors import NearestNeighbors
    g = torch.Generator().manual_seed(seed)
    bank, q = torch.randn(301, 7, generator=g), torch.randn(97, 7, generator=g)
    q[:5] = bank[10:15]  # exact matches: distance 0
    d = BL.nn_distance(q, bank, q_chunk=13, b_chunk=50)
    ref, _ = NearestNeighbors(n_neighbors=1).fit(bank.double().numpy()).kneighbors(q.double().numpy())
    np.testing.assert_allclose(d.numpy(), ref[:, 0], rtol=1e-5, atol=1e-5)


def test_greedy_coreset_is_farthest_point_selection():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    idx = BL.greedy_coreset(x, 20, seed=3).tolist()
    assert len(set(idx)) == 20
    xs = x.double().numpy()
    sel = [idx[0]]
    for _ in range(19):  # the farthest point from those selected, computed directly
        d = np.min(np.linalg.norm(xs[:, None] - xs[sel][None], axis=-1), axis=1)
        sel.append(int(np.argmax(d)))
    assert idx == sel
    assert sorted(BL.greedy_coreset(x, 200).tolist()) == list(range(200))
    # a coreset bank: nearest-neighbour distances can only grow; with the projection the size is kept
    q = torch.randn(50, 6, generator=g)
    assert torch.all(BL.nn_distance(q, x[idx]) >= BL.nn_distance(q, x) - 1e-6)
    assert BL.greedy_coreset(torch.randn(300, 256, generator=g), 30).unique().numel() == 30
    with pytest.raises(ValueError, match="coreset"):
        BL.coreset_size(10, 0.0)


def test_baselines_equal_a_direct_computation(bench, root):
    _, out = bench
    fod = C.load(out / "a" / "checkpoint.pt", "cpu", "reference")
    cfg = fod.cfg
    train_ds = AnomalyDataset(root / "a", "train", "mvtec", 32)
    train_ds = CAL.datasets(cfg, train_ds)[0]  # without the held-out calibration images, as FOD and the benchmark
    assert len(train_ds) == 5
    test_ds = AnomalyDataset(root / "a", "test", "mvtec", 32)
    res = BL.compute(fod, train_ds, test_ds, cfg, "cpu")
    from sklearn.neighbors import NearestNeighbors
    with torch.no_grad():
        tr = fod.tokens(torch.stack([train_ds[i]["image"] for i in range(len(train_ds))]))
        te = fod.tokens(torch.stack([test_ds[i]["image"] for i in range(len(test_ds))]))
    knn, md = [], []
    for a, b, mem in zip(tr, te, fod.memories):
        nn = NearestNeighbors(n_neighbors=1).fit(a.reshape(-1, a.shape[-1]).double().numpy())
        knn.append(torch.from_numpy(nn.kneighbors(b.reshape(-1, b.shape[-1]).double().numpy())[0][:, 0])
                   .view(b.shape[:2]))
        mean = a.double().mean(0)  # the reference memory: the per-position mean of the training tokens
        torch.testing.assert_close(mem.double(), mean, rtol=1e-5, atol=1e-6)
        md.append(torch.stack([torch.stack([torch.sqrt(((b[i, l].double() - mean[l]) ** 2).sum())
                                            for l in range(b.shape[1])]) for i in range(b.shape[0])]))

    def maps(level):
        return torch.stack([F.interpolate(s.view(-1, 1, *g).double(), size=(32, 32), mode="bilinear",
                                          align_corners=True)[:, 0] for s, g in zip(level, fod.grids)]).mean(0)

    np.testing.assert_allclose(res["maps"]["knn"], maps(knn).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(res["maps"]["memory_distance"], maps(md).numpy(), rtol=1e-4, atol=1e-4)
    m = json.loads((out / "a" / "metrics.json").read_text())
    assert {k: res["methods"]["rec_x_inter"][k] for k in ("image_auroc", "pixel_auroc", "aupro")} == \
           {k: m[k] for k in ("image_auroc", "pixel_auroc", "aupro")}
    with torch.no_grad():  # FOD's own maps, all test images in one batch
        np.testing.assert_allclose(res["maps"]["rec_x_inter"], fod.anomaly_maps(
            torch.stack([test_ds[i]["image"] for i in range(len(test_ds))])).numpy(), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- branch ablations

@pytest.mark.parametrize("branch", ["intra", "inter"])
def test_one_branch_layer_is_the_residual_branch(branch):
    torch.manual_seed(0)
    m = I2Correlation(16, 2, (3, 4), backend="reference", branches=(branch,))
    other = "inter" if branch == "intra" else "intra"
    assert not any(n.startswith(other) for n, _ in m.named_parameters())
    x, ref = torch.randn(2, 12, 16), torch.randn(1, 12, 16)
    h, si, se = m(x, ref if branch == "inter" else None)
    src = x if branch == "intra" else ref
    heads = m._heads
    o, kl, _, _ = correlation_reference(heads(getattr(m, f"{branch}_q")(x)), heads(getattr(m, f"{branch}_k")(src)),
                                  heads(getattr(m, f"{branch}_v")(src)), m._sigma(getattr(m, f"{branch}_sigma"), x),
                                  (3, 4), eps=m.eps)
    torch.testing.assert_close(h, x + getattr(m, f"{branch}_out")(m._merge(o)))
    mine, none = (si, se) if branch == "intra" else (se, si)
    assert none is None
    torch.testing.assert_close(mine.kl_attn, kl)
    # the kept branch starts from the same weights as in the two-branch layer (same seed)
    torch.manual_seed(0)
    both = I2Correlation(16, 2, (3, 4), backend="reference")
    torch.testing.assert_close(getattr(both, f"{branch}_q").weight, getattr(m, f"{branch}_q").weight)
    with pytest.raises(ValueError, match="branches"):
        I2Correlation(16, 2, (3, 4), branches=())


def test_loss_without_a_branch_drops_its_terms():
    torch.manual_seed(0)
    model = LevelModel(8, (3, 3), 16, 2, 2, backend="reference")
    feat, mem = torch.randn(2, 9, 8), torch.randn(9, 8)
    out, intra, inter = model(feat, mem)
    rec = reconstruction_loss(out, feat)
    both, _ = fod_loss(out, feat, intra, inter, 0.5, 0.25)
    only_intra, p = fod_loss(out, feat, intra, None, 0.5, 0.25)
    only_inter, q = fod_loss(out, feat, None, inter, 0.5, 0.25)
    torch.testing.assert_close(only_intra + only_inter - 2 * rec, both)
    torch.testing.assert_close(fod_loss(out, feat, None, None)[0], rec)
    assert math.isnan(p["k_inter"]) and math.isnan(q["k_intra"]) and not math.isnan(p["k_intra"])
    # neither branch: plain self-attention (the intra branch's attention, no statistics), scored by rec alone
    plain = LevelModel(8, (3, 3), 16, 2, 2, backend="reference", branches=())
    o, si, se = plain(feat, mem)
    assert si is None and se is None and o.shape == feat.shape and not hasattr(plain, "embed_ref")
    torch.testing.assert_close(token_scores(o, feat, se, si), rec_score(o, feat))
    assert SCORES[()].startswith("rec only")


@pytest.mark.parametrize("flags, score, absent, names", [
    (["--no-intra"], "no intra branch", ("intra_",), ["rec", "inter", "rec_x_inter"]),
    (["--no-inter"], "rec x intra", ("inter_", "embed_ref"), ["rec", "intra", "rec_x_intra"]),
])
def test_branch_ablation_training(root, tmp_path, flags, score, absent, names):
    out = tmp_path / "run"
    assert main(["train", "--data", str(root / "a"), "--output", str(out), *TINY, "--epochs", "1", *flags]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert score in m["score"]
    assert m["config"]["with_intra"] == ("--no-intra" not in flags)
    ck = C.load_raw(out / "checkpoint.pt")
    assert not any(a in k for k in ck["models"] for a in absent)
    assert math.isnan(m["history"][0]["k_intra"]) == ("--no-intra" in flags)
    assert math.isnan(m["history"][0]["k_inter"]) == ("--no-inter" in flags)
    fod = C.load(out / "checkpoint.pt", "cpu")
    res = BL.compute(fod, AnomalyDataset(root / "a", "train", "mvtec", 32),
                     AnomalyDataset(root / "a", "test", "mvtec", 32), fod.cfg, "cpu")
    assert list(res["methods"]) == ["knn", "memory_distance", *names]
    assert res["methods"][names[-1]]["pixel_auroc"] == m["pixel_auroc"]


# ----------------------------------------------------------------------------- fidelity options

def test_embedding_bias_option_and_old_checkpoints():
    assert LevelModel(8, (3, 3), 16, 2, 1).embed.proj.bias is not None
    m = LevelModel(8, (3, 3), 16, 2, 1, embed_bias=False)
    assert m.embed.proj.bias is None and m.embed_ref.proj.bias is None
    old = {k: v for k, v in vars(Config(data="x")).items() if k != "embed_bias"}  # written before the option
    assert C.config_of({"config": old}).embed_bias is False
    assert C.config_of({"config": {**old, "embed_bias": True}}).embed_bias is True


def test_compat_official_takes_the_official_batch_size_and_seed(tmp_path, capsys):
    p = build_parser()
    cfg = resolve_config(p.parse_args(["train", "--data", "x", "--output", "o", "--compat-official"]))
    assert (cfg.batch_size, cfg.seed) == (1, 3407)
    assert "batch_size 1, seed 3407" in capsys.readouterr().err
    cfg = resolve_config(p.parse_args(["train", "--data", "x", "--output", "o", "--compat-official", "--seed", "5"]))
    assert (cfg.batch_size, cfg.seed) == (1, 5)
    f = tmp_path / "c.toml"
    f.write_text('data = "x"\nbatch_size = 4\ncompat_official = true\n')
    cfg = resolve_config(p.parse_args(["train", "--config", str(f), "--output", "o"]))
    assert (cfg.batch_size, cfg.seed) == (4, 3407)
    assert resolve_config(p.parse_args(["train", "--data", "x", "--output", "o"])).batch_size == 8


# ----------------------------------------------------------------------------- categories and VisA

def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _visa(root, objects=("candle", "pcb1")):
    rows = ["object,split,label,image,mask"]
    rng = np.random.default_rng(0)
    for o in objects:
        for i in range(3):
            p = f"{o}/Data/Images/Normal/{i:04d}.JPG"
            _png(root / p, rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
            rows.append(f"{o},{'train' if i < 2 else 'test'},normal,{p},")
        p, mk = f"{o}/Data/Images/Anomaly/000.JPG", f"{o}/Data/Masks/Anomaly/000.png"
        _png(root / p, rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
        mask = np.zeros((20, 30), np.uint8)
        mask[5:15, 10:20] = 1  # VisA's masks hold small labels, not 255
        _png(root / mk, mask)
        rows.append(f"{o},test,anomaly,{p},{mk}")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def test_visa_layout(tmp_path):
    root = _visa(tmp_path / "VisA")
    train = list_samples(root / "candle", "train", "visa")
    test = list_samples(root / "candle", "test", "visa")
    assert [s.image.name for s in train] == ["0000.JPG", "0001.JPG"] and all(s.mask is None for s in train)
    assert [(s.defect, s.mask is not None) for s in test] == [("good", False), ("anomaly", True)]
    ds = AnomalyDataset(root / "candle", "test", "visa", 16)
    item = ds[1]
    assert item["label"] == 1 and item["mask"].any() and not item["mask"].all()
    assert ds[0]["label"] == 0 and not ds[0]["mask"].any()
    assert B.find_categories(root, "visa") == ["candle", "pcb1"]

    csv_path = root / "split_csv" / "1cls.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace("candle/Data/Masks/Anomaly/000.png", "candle/Data/Masks/Anomaly/9.png"))
    with pytest.raises(FileNotFoundError, match="9.png"):
        list_samples(root / "candle", "test", "visa")
    csv_path.write_text(text.replace("candle,test,anomaly", "candle,test,broken"))
    with pytest.raises(ValueError, match="label must be 'normal' or 'anomaly'"):
        list_samples(root / "candle", "test", "visa")
    csv_path.write_text(text.replace("object,", "thing,"))
    with pytest.raises(ValueError, match="missing column"):
        list_samples(root / "candle", "train", "visa")
    csv_path.unlink()
    with pytest.raises(FileNotFoundError, match="split_csv"):
        list_samples(root / "candle", "train", "visa")
    other = _visa(tmp_path / "other", ("widget",))
    assert B.find_categories(other, "visa") == ["widget"]


def test_category_discovery(tmp_path):
    r = tmp_path / "mv"
    for c in ("zipper", "bottle", "extra"):
        (r / c / "train" / "good").mkdir(parents=True)
    (r / "notes").mkdir()
    logs = []
    assert B.find_categories(r, "mvtec", log=logs.append) == ["bottle", "zipper"]  # standard, in the paper's order
    assert any("ignoring extra" in m for m in logs) and any("missing: cable" in m for m in logs)
    assert B.find_categories(r, "mvtec", ["extra", "bottle"]) == ["extra", "bottle"]
    with pytest.raises(FileNotFoundError, match="notes not found"):
        B.find_categories(r, "mvtec", ["notes"])
    with pytest.raises(FileNotFoundError, match="no btad categories"):
        B.find_categories(r, "btad")
    u = tmp_path / "mine"
    for c in ("x", "y"):
        (u / c / "train" / "ok").mkdir(parents=True)
    assert B.find_categories(u, "btad") == ["x", "y"]
    with pytest.raises(FileNotFoundError, match="dataset root not found"):
        B.find_categories(tmp_path / "nothing", "mvtec")


def test_benchmark_options_are_the_config_options():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    bench = {a.dest for a in sub["benchmark"]._actions}
    train = {a.dest for a in sub["train"]._actions if a.dest.startswith("cfg_")}
    assert train - {"cfg_data"} <= bench and "root" in bench
