"""Slow, literal Flash Memory (CSM + DAM) for testing `vstream.memory.flash`: Python lists of units and clusters,
loops over points and clusters, explicit differences for every distance. Each step follows the description in
`vstream.memory.flash`'s docstring line by line. Nothing in the package calls this module on a real path.

`RefFlashMemory(..., keep_all=True)` also keeps every unit ever seen (unbounded), so a test can compare the bounded
representatives with the true nearest unit of each centroid.
"""

from __future__ import annotations

import torch

from vstream.memory.flash import FlashMemoryConfig


def _sqdist(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).sum())


def ref_seeds(points: list[torch.Tensor], weights: list[float], k: int) -> list[int]:
    """The k points that cost most to merge away: weight x squared distance to the nearest other point. A point equal
    bit for bit to an earlier one is at distance 0 from it; later copies are not its neighbours."""
    costs = []
    for i, p in enumerate(points):
        nearest = float("inf")
        for j, q in enumerate(points):
            if i == j:
                continue
            same = torch.equal(p, q)
            if same and j > i:
                continue
            nearest = min(nearest, 0.0 if same else _sqdist(p, q))
        costs.append(weights[i] * nearest if weights[i] > 0 else 0.0)
    order = sorted(range(len(points)), key=lambda i: (-costs[i], i))
    return order[:k]


def ref_lloyd(points, weights, seeds, max_iter, tol):
    """Weighted Lloyd from `seeds`: (centroids, weights, labels, sources) where sources[j] = {point: coefficient}."""
    c = [points[s].double().clone() for s in seeds]
    src = [{s: 1.0} for s in seeds]
    labels, wsum = [0] * len(points), [0.0] * len(seeds)
    for _ in range(max_iter):
        new_labels = []
        for x in points:
            d = [_sqdist(x, cj) for cj in c]
            new_labels.append(d.index(min(d)))  # the first cluster wins ties
        new_c, new_src, new_wsum = [], [], []
        for j in range(len(c)):
            members = [i for i, lab in enumerate(new_labels) if lab == j]
            total = sum(weights[i] for i in members)
            new_wsum.append(total)
            if total > 0:
                new_c.append(sum(weights[i] * points[i].double() for i in members) / total)
                new_src.append({i: weights[i] / total for i in members})
            else:
                new_c.append(c[j])
                new_src.append(src[j])
        moved = sum(float((new_c[j] - c[j]).norm()) for j in range(len(c)))
        labels, wsum = new_labels, new_wsum
        if moved < tol:
            break
        c, src = new_c, new_src
    return c, wsum, labels, src


class RefFlashMemory:
    """Clusters are dicts {centroid, weight, span (first, last, mean), rep (a unit)}; a unit is a dict
    {id, time, small, full}."""

    def __init__(self, cfg: FlashMemoryConfig, merge: int = 4, keep_all: bool = False):
        self.cfg, self.merge, self.keep_all = cfg, merge, keep_all
        self.clusters: list[dict] = []
        self.all_units: list[dict] = []
        self.seen = 0

    def update(self, small: torch.Tensor, full: torch.Tensor, times) -> None:
        for i in range(small.shape[0]):
            unit = {"id": self.seen, "time": float(times[i]), "small": small[i], "full": full[i]}
            self.seen += 1
            if self.keep_all:
                self.all_units.append(unit)
            if len(self.clusters) < self.cfg.csm_length:
                t = unit["time"]
                self.clusters.append({"centroid": small[i].double(), "weight": 1.0, "span": (t, t, t), "rep": unit})
            else:
                self._cluster(unit)
            self._representatives(unit)

    def _cluster(self, unit: dict) -> None:
        t = unit["time"]
        points = [c["centroid"].float() for c in self.clusters] + [unit["small"].float()]
        weights = [c["weight"] for c in self.clusters] + [1.0]
        spans = [c["span"] for c in self.clusters] + [(t, t, t)]
        reps = [c["rep"] for c in self.clusters]
        seeds = ref_seeds(points, weights, self.cfg.csm_length)
        cents, wsum, labels, src = ref_lloyd(points, weights, seeds, self.cfg.kmeans_iters, self.cfg.kmeans_tol)
        clusters = []
        for j, centroid in enumerate(cents):
            if wsum[j] > 0:  # its members, each by its weight
                stands = {i: weights[i] for i, lab in enumerate(labels) if lab == j and weights[i] > 0}
            else:  # an empty cluster keeps its centroid: what that centroid averages
                stands = {i: a for i, a in src[j].items() if a > 0}
            first = min(spans[i][0] for i in stands)
            last = max(spans[i][1] for i in stands)
            mean = sum(a * spans[i][2] for i, a in stands.items()) / sum(stands.values())
            clusters.append({"centroid": centroid, "weight": wsum[j], "span": (first, last, mean), "rep": None})
        clusters.sort(key=lambda c: c["span"][2])  # stable: equal means keep cluster order
        self.clusters = clusters
        self._previous_reps = reps

    def _representatives(self, unit: dict) -> None:
        previous = getattr(self, "_previous_reps", None) or [c["rep"] for c in self.clusters if c["rep"] is not None]
        candidates = {u["id"]: u for u in previous}
        candidates[unit["id"]] = unit
        for c in self.clusters:
            d = {i: _sqdist(c["centroid"].float(), u["small"]) for i, u in candidates.items()}
            best = min(d.values())
            tied = [candidates[i] for i, v in d.items() if v <= best * (1 + 1e-5) + 1e-12]
            c["rep"] = max(tied, key=lambda u: u["time"])  # near-ties: the most recent
        self._previous_reps = None

    def dam_units(self) -> list[dict]:
        r = min(self.cfg.dam_length, len(self.clusters))
        heaviest = sorted(range(len(self.clusters)), key=lambda j: (-self.clusters[j]["weight"], j))[:r]
        return sorted((self.clusters[j]["rep"] for j in heaviest), key=lambda u: u["time"])

    def read_tokens(self) -> torch.Tensor:
        dam = [u["full"] for u in self.dam_units()]
        csm = [c["centroid"].float() for c in self.clusters]
        return torch.cat([*dam, *csm]).float()

    def true_nearest(self, cluster: dict) -> dict:
        """The unit of the whole stream nearest a cluster's centroid (needs keep_all)."""
        return min(self.all_units, key=lambda u: _sqdist(cluster["centroid"].float(), u["small"]))
