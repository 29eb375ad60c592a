"""Write a synthetic multi-category root in the MVTec AD layout for ``fod benchmark`` (no downloads).

Each category is the demo's generator (``fod.synthetic.make_dataset``) with its own seed, so the categories
share the woven texture's statistics but not a single image:

    python benchmarks/make_synthetic_root.py /tmp/syn3 --categories 3
    fod benchmark --data /tmp/syn3 --output runs/syn3 ...
"""
import argparse
from pathlib import Path

from fod.synthetic import make_dataset


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="new or empty directory")
    ap.add_argument("--categories", type=int, default=3, help="number of categories (default 3)")
    ap.add_argument("--train-images", type=int, default=60, help="training images per category (default 60)")
    ap.add_argument("--size", type=int, default=128, help="image size (default 128)")
    args = ap.parse_args(argv)
    for i in range(args.categories):
        make_dataset(Path(args.root) / f"fabric{i + 1}", size=args.size, n_train=args.train_images, seed=i)
    print(f"{args.categories} categories written to {args.root}: " +
          ", ".join(f"fabric{i + 1}" for i in range(args.categories)))


if __name__ == "__main__":
    main()
