"""How much of a Lloyd iteration distance bounds could skip, on benchmarks/kmeans.py's data.

    python benchmarks/kmeans_bounds.py --ks 2,8

A bounds-pruned Lloyd pass (srdjax's `_lloyd_pruned` keeps Hamerly's bounds) reads only the rows
whose bounds cannot prove they keep their cluster. This runs plain Lloyd in numpy (float64,
scikit-learn's k-means++ start) and, at every iteration, counts the rows each rule would have
to read if its bounds had been exact one iteration before and then loosened by that iteration's
center shifts:
- Hamerly: one lower bound (second-nearest center) per row; the row is read if
  u > max(l, s_a), s_a half the distance from its center to the nearest other center.
- Elkan: one lower bound per (row, center); the row is read if u > s_a and, for some other
  center j, u > l_j and u > half the distance between the two centers.
Real runs keep bounds that were last tightened several iterations ago, so they read more: these
fractions are what any pruning by these bounds can at best achieve. A pass that reads a fraction
f of the rows can at best be 1/f times faster than a full pass, which is memory-bound on a CPU.
Writes benchmarks/results/kmeans_bounds.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.cluster import kmeans_plusplus

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine, write_json  # noqa: E402
from benchmarks.kmeans import make_data  # noqa: E402


def read_fractions(x, k, seed, max_iter, tol):
    """Per iteration, the fraction of rows Hamerly's and Elkan's bounds would read."""
    n = len(x)
    x_sq = (x * x).sum(1)
    threshold = tol * x.var(0).mean()     # scikit-learn's stopping rule

    def distances(c):
        return np.sqrt(np.maximum(x_sq[:, None] - 2.0 * x @ c.T + (c * c).sum(1), 0.0))

    centers, _ = kmeans_plusplus(x, k, random_state=seed)
    hamerly, elkan = [], []
    rows = np.arange(n)
    for _ in range(max_iter):
        dist = distances(centers)
        label = dist.argmin(1)
        new = np.stack([x[label == j].mean(0) if np.any(label == j) else centers[j]
                        for j in range(k)])
        shift = np.sqrt(((new - centers) ** 2).sum(1))
        centers = new
        if (shift ** 2).sum() <= threshold:
            break
        # Bounds exact at the old centers, loosened by this iteration's shifts.
        upper = dist[rows, label] + shift[label]
        lower = dist - shift[None, :]
        lower[rows, label] = np.inf
        top = shift.argmax()
        second_shift = np.where(np.arange(k) == top, 0.0, shift).max()
        # Hamerly loosens the second-nearest distance by the largest shift of another center.
        one_lower = np.sort(dist, 1)[:, 1] - np.where(label == top, second_shift, shift[top])
        gap = np.sqrt(((centers[:, None] - centers[None]) ** 2).sum(-1))
        np.fill_diagonal(gap, np.inf)
        half = 0.5 * gap.min(1)
        hamerly.append(float(np.mean(upper > np.maximum(half[label], one_lower))))
        elkan.append(float(np.mean((upper > half[label]) & np.any(
            (upper[:, None] > lower) & (upper[:, None] > 0.5 * gap[label]), axis=1))))
    return hamerly, elkan


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--ks", default="2,8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-iter", type=int, default=300)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--out", default="benchmarks/results/kmeans_bounds.json")
    args = ap.parse_args()
    x = make_data(args.n, args.d, args.seed).astype(np.float64)
    rows = []
    for k in map(int, args.ks.split(",")):
        hamerly, elkan = read_fractions(x, k, args.seed + k, args.max_iter, args.tol)
        row = {"k": k, "iterations": len(hamerly), "hamerly_mean": float(np.mean(hamerly)),
               "elkan_mean": float(np.mean(elkan)),
               "hamerly_by_tenth": [float(np.mean(p)) for p in np.array_split(hamerly, 10)],
               "elkan_by_tenth": [float(np.mean(p)) for p in np.array_split(elkan, 10)]}
        rows.append(row)
        print(f"k={k}: {row['iterations']} iterations; rows read per iteration at best: "
              f"Hamerly {row['hamerly_mean']:.3f}, Elkan {row['elkan_mean']:.3f} "
              f"(by tenth of the run, Hamerly: "
              + " ".join(f"{p:.2f}" for p in row["hamerly_by_tenth"]) + ")", flush=True)
    write_json(args.out, {"machine": machine(), "n": args.n, "d": args.d, "seed": args.seed,
                          "tol": args.tol, "rows": rows})


if __name__ == "__main__":
    main()
