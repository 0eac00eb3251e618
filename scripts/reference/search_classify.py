"""scikit-learn's logistic regression on labelled chips of an embedding dataset: the reference for
`geossl-serve classify` and `POST /v1/indexes/{name}/classify`.

    python search_classify.py DATASET.parquet LABELS.tif CLASS C PER_CLASS SEED

Each row's label is the majority class of LABELS (a class raster on the scene's grid) inside its window,
kept when at least 80 % of the window's labelled pixels agree. PER_CLASS rows of CLASS (positives) and
PER_CLASS rows of other classes (negatives) are drawn with numpy's generator seeded SEED. The model is
LogisticRegression(C) on the L2-normalized embeddings (float64, tol 1e-10), as geossl fits it. Prints one
JSON line: positives, negatives (chip ids), scores (chip id → decision value, every row), intercept.
"""

import json
import sys

import numpy as np
import pyarrow.parquet as pq
import rasterio
from sklearn.linear_model import LogisticRegression

path, labels_path, cls, c, per, seed = sys.argv[1:7]
cls, c, per, seed = int(cls), float(c), int(per), int(seed)
t = pq.read_table(path, columns=["chip_id", "window", "embedding"]).to_pydict()
ids = t["chip_id"]
x = np.array(t["embedding"], dtype=np.float64)
x /= np.linalg.norm(x, axis=1, keepdims=True)
with rasterio.open(labels_path) as d:
    lab = d.read(1)
    nodata = d.nodata
rows = []
for i, w in enumerate(t["window"]):
    v = lab[w["y"] : w["y"] + w["h"], w["x"] : w["x"] + w["w"]].ravel()
    v = v[v != nodata] if nodata is not None else v
    if v.size == 0:
        continue
    vals, counts = np.unique(v, return_counts=True)
    k = counts.argmax()
    if counts[k] >= 0.8 * v.size:
        rows.append((i, int(vals[k])))
rng = np.random.default_rng(seed)
pos = [i for i, l in rows if l == cls]
neg = [i for i, l in rows if l != cls]
if len(pos) < per or len(neg) < per:
    sys.exit(f"{len(pos)} pure chips of class {cls} and {len(neg)} of others: fewer than {per}")
pos = sorted(rng.choice(pos, per, replace=False).tolist())
neg = sorted(rng.choice(neg, per, replace=False).tolist())
m = LogisticRegression(C=c, tol=1e-10, max_iter=100000).fit(x[pos + neg], [1] * per + [0] * per)
scores = m.decision_function(x)
print(json.dumps({
    "positives": [ids[i] for i in pos],
    "negatives": [ids[i] for i in neg],
    "scores": {ids[i]: float(s) for i, s in enumerate(scores)},
    "intercept": float(m.intercept_[0]),
}))
