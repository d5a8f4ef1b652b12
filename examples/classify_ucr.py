"""Classify six UCR/UEA datasets with MambaClassifier, against ROCKET and 1-NN DTW (sktime).

The datasets ship with sktime (no download): GunPoint, ItalyPowerDemand, ArrowHead, OSULeaf
(univariate), BasicMotions and JapaneseVowels (multivariate; JapaneseVowels has series of
unequal length).  Every method is fitted on the official train split and scored (accuracy) on
the test split, in the same run.  MambaClassifier gets the series as they are (a list of
unequal-length series for JapaneseVowels, masked); ROCKET and 1-NN DTW get JapaneseVowels
padded at the end with each series' last value (sktime's versions need equal lengths).

Run:  python examples/classify_ucr.py [--datasets GunPoint,...] [--steps 400] [--seeds 1]
      [--val-fraction 0.2]
      (needs sktime: pip install sktime)
"""

import argparse
import time

import numpy as np

from numba_mamba.timeseries import MambaClassifier

DATASETS = ("GunPoint", "ItalyPowerDemand", "ArrowHead", "OSULeaf", "BasicMotions",
            "JapaneseVowels")


def load(name, split):
    """``(series, labels)``: a list of (length, channels) arrays and the labels."""
    from sktime.datasets import load_UCR_UEA_dataset
    X, y = load_UCR_UEA_dataset(name, split=split, return_X_y=True)
    series = [np.stack([np.asarray(X.iloc[i, c], dtype=np.float64)
                        for c in range(X.shape[1])], axis=-1) for i in range(X.shape[0])]
    return series, np.asarray(y)


def padded(series, length):
    """``(n, channels, length)`` for sktime: each series padded with its last value."""
    return np.stack([np.concatenate([s, np.repeat(s[-1:], length - len(s), axis=0)]).T
                     for s in series])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=1, help="n_seeds of MambaClassifier")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-fraction", type=float, default=0.0,
                    help="MambaClassifier's early-stopping split (0: none, the default)")
    args = ap.parse_args()
    from sktime.classification.distance_based import KNeighborsTimeSeriesClassifier
    from sktime.classification.kernel_based import RocketClassifier

    rows = []
    for name in args.datasets.split(","):
        Xtr, ytr = load(name, "train")
        Xte, yte = load(name, "test")
        L = max(len(s) for s in Xtr + Xte)
        equal = all(len(s) == L for s in Xtr + Xte)
        t0 = time.perf_counter()
        clf = MambaClassifier(steps=args.steps, n_seeds=args.seeds, seed=args.seed,
                              val_fraction=args.val_fraction)
        clf.fit(Xtr if not equal else np.stack(Xtr), ytr)
        acc_m = clf.score(Xte if not equal else np.stack(Xte), yte)
        t_m = time.perf_counter() - t0
        Ptr, Pte = padded(Xtr, L), padded(Xte, L)
        t0 = time.perf_counter()
        acc_r = float((RocketClassifier(random_state=args.seed).fit(Ptr, ytr).predict(Pte)
                       == yte).mean())
        t_r = time.perf_counter() - t0
        t0 = time.perf_counter()
        acc_d = float((KNeighborsTimeSeriesClassifier(n_neighbors=1, distance="dtw")
                       .fit(Ptr, ytr).predict(Pte) == yte).mean())
        t_d = time.perf_counter() - t0
        rows.append((name, len(Xtr), len(Xte), L, Xtr[0].shape[1], acc_m, acc_r, acc_d,
                     t_m, t_r, t_d))
        print(f"{name}: Mamba {acc_m:.3f} ({t_m:.0f} s), ROCKET {acc_r:.3f} ({t_r:.0f} s), "
              f"1-NN DTW {acc_d:.3f} ({t_d:.0f} s)", flush=True)
    print(f"\nTest accuracy (MambaClassifier: steps {args.steps}, seeds {args.seeds}, "
          f"val_fraction {args.val_fraction}; "
          f"ROCKET: sktime RocketClassifier, 10000 kernels; 1-NN DTW: sktime, full window)")
    print(f"{'dataset':<18}{'train':>6}{'test':>6}{'len':>5}{'ch':>4}{'Mamba':>8}{'ROCKET':>8}"
          f"{'1NN-DTW':>9}{'s Mamba':>9}{'s ROCKET':>9}{'s DTW':>7}")
    for r in rows:
        print(f"{r[0]:<18}{r[1]:>6}{r[2]:>6}{r[3]:>5}{r[4]:>4}{r[5]:8.3f}{r[6]:8.3f}{r[7]:9.3f}"
              f"{r[8]:9.0f}{r[9]:9.0f}{r[10]:7.0f}")
    acc = np.array([r[5:8] for r in rows])
    print(f"{'mean':<39}{acc[:, 0].mean():8.3f}{acc[:, 1].mean():8.3f}{acc[:, 2].mean():9.3f}")


if __name__ == "__main__":
    main()
