"""scikit-learn's scores of the features `geossl-train eval` scored: the reference for its kNN and probe.

    python eval_sklearn.py FEATURES_DIR C1,C2,... K T

FEATURES_DIR holds {train,val,test}_{x,y}.npy as eval writes them. kNN: KNeighborsClassifier with cosine
distance d and weights exp((1 - d) / T) (the similarity-weighted vote); probe: StandardScaler on the
fitting rows, LogisticRegression(C) tight (tol 1e-8), C chosen on validation top-1 (ties: the smaller),
refitted on train + validation. Prints JSON: knn_top1, val_top1 per C, c, probe_top1, probe_pred.
"""

import json
import sys

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

d, cs, k, t = sys.argv[1], [float(c) for c in sys.argv[2].split(",")], int(sys.argv[3]), float(sys.argv[4])
load = lambda n: (np.load(f"{d}/{n}_x.npy").astype(np.float64), np.load(f"{d}/{n}_y.npy"))
(xtr, ytr), (xva, yva), (xte, yte) = load("train"), load("val"), load("test")

knn = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute", weights=lambda dist: np.exp((1.0 - dist) / t))
knn.fit(xtr, ytr)
knn_top1 = float((knn.predict(xte) == yte).mean())


def probe(x, y, c):
    s = StandardScaler().fit(x)
    return s, LogisticRegression(C=c, tol=1e-8, max_iter=100000).fit(s.transform(x), y)


val_top1 = []
for c in cs:
    s, m = probe(xtr, ytr, c)
    val_top1.append(float((m.predict(s.transform(xva)) == yva).mean()))
best = max(range(len(cs)), key=lambda i: (val_top1[i], -cs[i]))
s, m = probe(np.concatenate([xtr, xva]), np.concatenate([ytr, yva]), cs[best])
pred = m.predict(s.transform(xte))
print(json.dumps({
    "knn_top1": knn_top1,
    "val_top1": val_top1,
    "c": cs[best],
    "probe_top1": float((pred == yte).mean()),
    "probe_pred": pred.tolist(),
}))
