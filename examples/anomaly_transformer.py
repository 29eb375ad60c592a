"""Anomaly Transformer (ICLR 2022) on fod_kernels: train, then evaluate with the official protocol and an honest one.

    python examples/anomaly_transformer.py                                          # embedded synthetic series
    python examples/anomaly_transformer.py --dataset PSM --data-path dataset/PSM    # official file layouts:
    #   SMD, MSL, SMAP: <path>/<NAME>_train.npy, <NAME>_test.npy, <NAME>_test_label.npy
    #   PSM:            <path>/train.csv, test.csv, test_label.csv (a header row; the first column, the time
    #                   stamp, is dropped; missing values become 0)

As the official code: the channels are standardised with the training series' mean and standard deviation;
training windows are taken with a stride of 100 steps on SMD and 1 elsewhere; test windows do not overlap (a
tail shorter than a window is left out); Adam, lr 1e-4 halved after every epoch, k = 3; the energy is the
official criterion (model.energy, temperature 50). The official script selects its checkpoint by early stopping
on the test set; here the last epoch is evaluated.

Two evaluations of the same test energies are printed:
- official protocol: threshold at the (100 - anomaly_ratio) percentile of the training and test energies
  together (the threshold sees the test set), then point adjustment (a detected point marks its whole true
  anomaly segment), precision/recall/F1. Point adjustment inflates F1 (Kim et al., AAAI 2022).
- honest: threshold at the same percentile of the training energies alone, point-wise precision/recall/F1
  without adjustment, and the threshold-free AUROC and AUPRC of the energy.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing it
from fod_kernels import BACKENDS  # noqa: E402
from fod_kernels.models import AnomalyTransformer, anomaly_transformer_loss  # noqa: E402

# name -> (files, training stride, anomaly ratio in %, epochs) of the official scripts (scripts/*.sh)
DATASETS = {
    "SMD": (("SMD_train.npy", "SMD_test.npy", "SMD_test_label.npy"), 100, 0.5, 10),
    "MSL": (("MSL_train.npy", "MSL_test.npy", "MSL_test_label.npy"), 1, 1.0, 3),
    "SMAP": (("SMAP_train.npy", "SMAP_test.npy", "SMAP_test_label.npy"), 1, 1.0, 3),
    "PSM": (("train.csv", "test.csv", "test_label.csv"), 1, 1.0, 3),
}
SYNTHETIC = (None, 10, 3.0, 4)  # the demo: stride 10, 3 % of the test steps anomalous, 4 epochs


# ----------------------------------------------------------------------------- data

def _read(path: Path) -> np.ndarray:
    if path.suffix == ".csv":  # PSM: header row, then time stamp + values; empty fields are NaN -> 0
        return np.nan_to_num(np.genfromtxt(path, delimiter=",", skip_header=1, dtype=np.float64, ndmin=2)[:, 1:])
    return np.load(path)


def load_official(name: str, root: Path):
    """(train (N, C), test (M, C), labels (M,)) standardised with the training statistics, as the official loaders."""
    files = [root / f for f in DATASETS[name][0]]
    train, test, labels = (_read(f) for f in files)
    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std == 0, 1.0, std)  # sklearn's StandardScaler: a constant channel is only centred
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32), \
        labels.reshape(len(test), -1)[:, 0].astype(np.int64)


def synthetic(n_train=2000, n_test=2000, channels=5, seed=0):
    """A multivariate series of coupled sines with noise; the test part has injected point anomalies (single-step
    spikes), contextual ones (a channel's values stay in range but its phase flips for a few steps) and
    collective ones (a channel flattens for tens of steps). Returns standardised train, test, labels."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_train + n_test)
    periods = rng.uniform(20, 60, channels)
    phases = rng.uniform(0, 2 * np.pi, channels)
    base = np.sin(2 * np.pi * t[:, None] / periods + phases)
    x = base + 0.3 * np.roll(base, 1, axis=1) + 0.05 * rng.standard_normal(base.shape)
    test, labels = x[n_train:].copy(), np.zeros(n_test, dtype=np.int64)
    free = np.ones(n_test, dtype=bool)
    free[:50] = free[-50:] = False

    def place(length):
        for _ in range(1000):
            s = int(rng.integers(0, n_test - length))
            if free[max(0, s - 20): s + length + 20].all():
                free[s: s + length] = False
                labels[s: s + length] = 1
                return s
        raise RuntimeError("no room left for another anomaly")

    for _ in range(max(1, n_test // 500)):
        s, c = place(1), rng.integers(channels)
        test[s, c] += rng.choice([-1, 1]) * rng.uniform(3, 5)                    # point
        s, c, n = place(8), rng.integers(channels), 8
        test[s: s + n, c] = x[n_train + s - int(periods[c] / 2): n_train + s - int(periods[c] / 2) + n, c]  # contextual
        s, c = place(20), rng.integers(channels)
        test[s: s + 20, c] = test[s, c]                                          # collective
    train = x[:n_train]
    mean, std = train.mean(0), train.std(0)
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32), labels


def windows(series: np.ndarray, win: int, stride: int) -> torch.Tensor:
    """(n, win, C): the windows series[i * stride: i * stride + win], n = (len - win) // stride + 1."""
    n = (len(series) - win) // stride + 1
    return torch.from_numpy(np.stack([series[i * stride: i * stride + win] for i in range(n)]))


# ----------------------------------------------------------------------------- metrics

def point_adjust(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """The official detection adjustment: every true anomaly segment with a detected point is detected whole.
    (The official loop never extends a segment back to index 0; that one point aside, it is this.)"""
    pred = pred.copy()
    edges = np.flatnonzero(np.diff(np.concatenate([[0], gt, [0]])))
    for s, e in zip(edges[::2], edges[1::2]):
        if pred[s:e].any():
            pred[s:e] = 1
    return pred


def evaluate(train_energy, test_energy, labels, anomaly_ratio):
    from sklearn.metrics import average_precision_score, precision_recall_fscore_support, roc_auc_score

    def prf(pred):
        p, r, f, _ = precision_recall_fscore_support(labels, pred, average="binary", zero_division=0)
        return dict(precision=float(p), recall=float(r), f1=float(f))

    q = 100 - anomaly_ratio
    thr_official = np.percentile(np.concatenate([train_energy, test_energy]), q)
    thr_honest = np.percentile(train_energy, q)
    official = prf(point_adjust((test_energy > thr_official).astype(np.int64), labels))
    honest = prf((test_energy > thr_honest).astype(np.int64))
    both = len(np.unique(labels)) == 2
    honest.update(auroc=float(roc_auc_score(labels, test_energy)) if both else math.nan,
                  auprc=float(average_precision_score(labels, test_energy)) if both else math.nan)
    return {"official": official, "honest": honest}


# ----------------------------------------------------------------------------- train and score

@torch.no_grad()
def energies(model, wins: torch.Tensor, batch: int) -> np.ndarray:
    model.eval()
    return torch.cat([model.energy(wins[i: i + batch]) for i in range(0, len(wins), batch)]).reshape(-1).numpy()


def train(model, wins: torch.Tensor, args) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    losses = []
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(wins), generator=g)
        total = 0.0
        for i in range(0, len(wins), args.batch_size):
            x = wins[perm[i: i + args.batch_size]]
            out, stats = model(x)
            loss = anomaly_transformer_loss(x, out, stats, k=args.k)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(x)
        losses.append(total / len(wins))
        for group in opt.param_groups:  # the official schedule: lr * 0.5 ** epoch
            group["lr"] = args.lr * 0.5 ** (epoch + 1)
    return losses


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2, before any work
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv):
    ap = _Parser(prog="anomaly_transformer.py", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="synthetic", choices=["synthetic", *DATASETS])
    ap.add_argument("--data-path", type=Path, help="folder with the dataset's files (official layout)")
    ap.add_argument("--win-size", type=int, default=100)
    ap.add_argument("--epochs", type=int, help="default: the official script's (SMD 10, others 3; demo 4)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 256 (official), 32 for the demo")
    ap.add_argument("--lr", type=float, help="default 1e-4 (official), 1e-3 for the demo")
    ap.add_argument("--k", type=float, default=3.0)
    ap.add_argument("--d-model", type=int, default=None, help="default 512 (official), 32 for the demo")
    ap.add_argument("--n-heads", type=int, default=8)
    ap.add_argument("--e-layers", type=int, default=3)
    ap.add_argument("--d-ff", type=int, default=None, help="default: d_model")
    ap.add_argument("--anomaly-ratio", type=float, help="in %%; default: the official script's")
    ap.add_argument("--stride", type=int, help="training-window stride; default: the official loader's")
    ap.add_argument("--max-train-windows", type=int, default=0, help="use only this many (evenly spaced); 0: all")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    demo = args.dataset == "synthetic"
    files, stride, ratio, epochs = SYNTHETIC if demo else DATASETS[args.dataset]
    if demo and args.data_path is not None:
        ap.error("--data-path is for the official datasets; the synthetic series is generated")
    if not demo:
        if args.data_path is None:
            ap.error(f"--dataset {args.dataset} needs --data-path (a folder with {', '.join(files)})")
        missing = [f for f in files if not (args.data_path / f).is_file()]
        if missing:
            ap.error(f"{args.data_path} lacks {', '.join(missing)} (the official layout of {args.dataset})")
    args.stride = args.stride or stride
    args.anomaly_ratio = ratio if args.anomaly_ratio is None else args.anomaly_ratio
    args.epochs = epochs if args.epochs is None else args.epochs
    args.batch_size = args.batch_size or (32 if demo else 256)
    args.lr = args.lr or (1e-3 if demo else 1e-4)
    args.d_model = args.d_model or (32 if demo else 512)
    args.d_ff = args.d_ff or args.d_model
    for name in ("win_size", "epochs", "batch_size", "d_model", "n_heads", "e_layers", "d_ff", "stride"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.backend != "auto" and args.backend not in BACKENDS:
        ap.error(f"--backend {args.backend!r}: choose auto or one of {', '.join(BACKENDS)}")
    if args.d_model % args.n_heads:
        ap.error(f"--d-model {args.d_model} is not divisible by --n-heads {args.n_heads}")
    if not 0 < args.anomaly_ratio < 100:
        ap.error("--anomaly-ratio must be in (0, 100)")
    return args, ap


def main(argv=None):
    args, ap = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.dataset == "synthetic":
        train_s, test_s, labels = synthetic(seed=args.seed)
    else:
        train_s, test_s, labels = load_official(args.dataset, args.data_path)
    if min(len(train_s), len(test_s)) < args.win_size:
        ap.error(f"--win-size {args.win_size} is longer than the series ({len(train_s)} training, "
                 f"{len(test_s)} test steps)")
    train_w = windows(train_s, args.win_size, args.stride)
    if 0 < args.max_train_windows < len(train_w):
        train_w = train_w[np.linspace(0, len(train_w) - 1, args.max_train_windows).round().astype(int)]
    test_w = windows(test_s, args.win_size, args.win_size)
    labels = labels[: test_w.shape[0] * args.win_size]
    C = train_s.shape[1]
    model = AnomalyTransformer(args.win_size, C, C, d_model=args.d_model, n_heads=args.n_heads,
                               e_layers=args.e_layers, d_ff=args.d_ff, backend=args.backend)
    print(f"{args.dataset}: train {train_s.shape}, test {test_s.shape}, {labels.mean() * 100:.2f}% anomalous; "
          f"{len(train_w)} training windows of {args.win_size}")
    t0 = time.perf_counter()
    losses = train(model, train_w, args)
    print(f"trained {args.epochs} epochs in {time.perf_counter() - t0:.1f} s; loss per epoch "
          + ", ".join(f"{v:.4f}" for v in losses))
    train_e = energies(model, train_w, args.batch_size)
    test_e = energies(model, test_w, args.batch_size)
    res = evaluate(train_e, test_e, labels, args.anomaly_ratio)
    o, h = res["official"], res["honest"]
    print(f"official protocol (threshold on train+test energies, point adjustment): P {o['precision']:.4f} "
          f"R {o['recall']:.4f} F1 {o['f1']:.4f}")
    print(f"honest (threshold on training energies, point-wise):                    P {h['precision']:.4f} "
          f"R {h['recall']:.4f} F1 {h['f1']:.4f}  AUROC {h['auroc']:.4f}  AUPRC {h['auprc']:.4f}")
    return res


if __name__ == "__main__":
    main()
