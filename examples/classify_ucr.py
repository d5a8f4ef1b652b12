"""Classify six UCR/UEA datasets with MambaClassifier, against ROCKET and 1-NN DTW (sktime).

The datasets ship with sktime (no download): GunPoint, ItalyPowerDemand, ArrowHead, OSULeaf
(univariate), BasicMotions and JapaneseVowels (multivariate; JapaneseVowels has series of
unequal length).  Every method is fitted on the official train split and scored (accuracy) on
the test split, in the same run.  MambaClassifier gets the series as they are (a list of
unequal-length series for JapaneseVowels, masked); ROCKET and 1-NN DTW get JapaneseVowels
padded at the end with each series' last value (sktime's versions need equal lengths).

Run:  python examples/classify_ucr.py [--datasets GunPoint,...] [--steps 400] [--seeds 1]
      [--val-fraction 0.2] [--pool meanmax] [--[no-]bidirectional] [--crop 0.8] [--jitter 0.1]
      [--select 0.3]
      (needs sktime: pip install sktime)

``--select F`` never loads the test split: it holds out a stratified share F of each training
split, fits MambaClassifier only on the rest and reports its accuracy on the held-out part (to
choose a configuration without looking at the test sets).
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


def fit_score(Xtr, ytr, Xte, yte, options):
    """MambaClassifier(**options) fitted on ``(Xtr, ytr)``, its accuracy on ``(Xte, yte)``."""
    equal = len({len(s) for s in Xtr + Xte}) == 1
    clf = MambaClassifier(**options)
    clf.fit(np.stack(Xtr) if equal else Xtr, ytr)
    return clf.score(np.stack(Xte) if equal else Xte, yte)


def select(names, share, options):
    """Accuracy on a stratified ``share`` of each training split, fitted on the rest."""
    accs = []
    for name in names:
        X, y = load(name, "train")
        rng = np.random.default_rng(12345)
        held = np.sort(np.concatenate([
            rng.permutation(np.nonzero(y == c)[0])[:max(1, int(round(share * (y == c).sum())))]
            for c in np.unique(y)]))
        fit = np.setdiff1d(np.arange(len(y)), held)
        t0 = time.perf_counter()
        acc = fit_score([X[i] for i in fit], y[fit], [X[i] for i in held], y[held], options)
        accs.append(acc)
        print(f"{name}: fitted on {len(fit)}, held-out accuracy {acc:.3f} on {len(held)} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"mean held-out accuracy {np.mean(accs):.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=MambaClassifier().n_seeds,
                    help="n_seeds of MambaClassifier")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-fraction", type=float, default=0.0,
                    help="MambaClassifier's early-stopping split (0: none, the default)")
    d = MambaClassifier().get_params()  # the command line's defaults are the library's
    ap.add_argument("--pool", default=d["pool"], help="MambaClassifier's pool")
    ap.add_argument("--features", type=int, default=d["n_features"],
                    help="n_features (pool meanmax)")
    ap.add_argument("--bidirectional", action=argparse.BooleanOptionalAction,
                    default=d["bidirectional"])
    ap.add_argument("--crop", type=float, default=d["crop"])
    norm = {True: "series", False: "none"}.get(d["normalize"], d["normalize"])
    ap.add_argument("--normalize", choices=("series", "global", "none"), default=norm,
                    help="MambaClassifier's normalize (none: False)")
    ap.add_argument("--jitter", type=float, default=d["jitter"])
    ap.add_argument("--select", type=float, default=0.0,
                    help="hold out this share of each training split (test split unused)")
    args = ap.parse_args()
    options = dict(steps=args.steps, n_seeds=args.seeds, seed=args.seed,
                   val_fraction=args.val_fraction, pool=args.pool, n_features=args.features,
                   bidirectional=args.bidirectional, crop=args.crop, jitter=args.jitter,
                   normalize=False if args.normalize == "none" else args.normalize)
    print(f"MambaClassifier options: {options}")
    if args.select:
        return select(args.datasets.split(","), args.select, options)
    from sktime.classification.distance_based import KNeighborsTimeSeriesClassifier
    from sktime.classification.kernel_based import RocketClassifier

    rows = []
    for name in args.datasets.split(","):
        Xtr, ytr = load(name, "train")
        Xte, yte = load(name, "test")
        L = max(len(s) for s in Xtr + Xte)
        t0 = time.perf_counter()
        acc_m = fit_score(Xtr, ytr, Xte, yte, options)
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
    print(f"\nTest accuracy (MambaClassifier: {options}; "
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
