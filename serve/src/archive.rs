//! Archive embedding at scale: plan once, embed shards anywhere, verify.
//!
//! - [`make_plan`] freezes the resolved inputs (files, or band groups) into a
//!   sorted plan file; its SHA-256 identifies it.
//! - [`run_shard`] embeds shard `i` of `n` (inputs `k` with `k % n == i`) into a
//!   dataset directory: `part-{i:05}.parquet` written atomically, then the
//!   success marker `_SUCCESS-{i:05}.json` (rows, files, per-file failures, plan
//!   hash). A shard whose marker exists for the same plan is skipped; one without
//!   a marker is redone (same rows, same bytes); a marker of another plan is
//!   refused, so a plan that changed under running shards is never mixed in.
//! - [`verify`] checks a dataset against its plan: every shard done, no chip id twice.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::embed::{collect_inputs, EmbedOptions, Input, Summary};

/// Current plan format.
pub const PLAN_VERSION: u32 = 1;

/// A frozen, sorted list of inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub version: u32,
    pub band_groups: bool,
    pub inputs: Vec<PlanInput>,
}

/// One input of a plan: a file, or a band group's files in band order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanInput {
    pub path: String,
    pub files: Vec<String>,
}

/// What a finished shard wrote, saved last as its success marker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Marker {
    pub plan_sha256: String,
    pub shard_index: usize,
    pub shard_count: usize,
    pub rows: usize,
    pub files: usize,
    pub nodata_windows: usize,
    /// Inputs that could not be read, each with the reason.
    pub failed: Vec<String>,
}

/// `dir/part-{index:05}.parquet`.
pub fn part_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("part-{index:05}.parquet"))
}

/// `dir/_SUCCESS-{index:05}.json`.
pub fn marker_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("_SUCCESS-{index:05}.json"))
}

fn canonical(p: &Path) -> String {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string()
}

/// Resolves `inputs` (as `geossl-serve embed` does) into a sorted plan of canonical paths.
pub fn make_plan(inputs: &[PathBuf], band_groups: bool) -> Result<Plan, String> {
    let mut planned: Vec<PlanInput> = collect_inputs(inputs, band_groups)?
        .iter()
        .map(|i| PlanInput { path: canonical(&i.path), files: i.files.iter().map(|f| canonical(f)).collect() })
        .collect();
    planned.sort_by(|a, b| a.path.cmp(&b.path));
    planned.dedup();
    Ok(Plan { version: PLAN_VERSION, band_groups, inputs: planned })
}

/// Writes `bytes` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let name = path.file_name().ok_or_else(|| format!("{}: not a file path", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let r = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.map_err(|e| format!("{}: {e}", path.display()))
}

/// Saves `plan` as JSON (atomically); returns its SHA-256.
pub fn write_plan(plan: &Plan, path: &Path) -> Result<String, String> {
    let bytes = serde_json::to_vec_pretty(plan).map_err(|e| e.to_string())?;
    write_atomic(path, &bytes)?;
    Ok(geossl_models::sha256_hex(&bytes))
}

/// Reads a plan and its SHA-256.
pub fn read_plan(path: &Path) -> Result<(Plan, String), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("plan {}: {e}", path.display()))?;
    let plan: Plan =
        serde_json::from_slice(&bytes).map_err(|e| format!("plan {}: not a geossl plan: {e}", path.display()))?;
    if plan.version != PLAN_VERSION {
        return Err(format!("plan {}: version {} (this geossl reads {PLAN_VERSION})", path.display(), plan.version));
    }
    Ok((plan, geossl_models::sha256_hex(&bytes)))
}

/// The inputs of shard `index` of `count`: every `count`-th, from `index`.
pub fn shard_inputs(plan: &Plan, index: usize, count: usize) -> Vec<Input> {
    plan.inputs
        .iter()
        .skip(index)
        .step_by(count.max(1))
        .map(|i| Input { path: PathBuf::from(&i.path), files: i.files.iter().map(PathBuf::from).collect() })
        .collect()
}

fn read_marker(path: &Path) -> Result<Option<Marker>, String> {
    match std::fs::read(path) {
        Ok(b) => {
            serde_json::from_slice(&b).map(Some).map_err(|e| format!("{}: unreadable marker: {e}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// How a shard ended.
#[derive(Debug, Clone, PartialEq)]
pub enum ShardOutcome {
    /// Embedded now.
    Done(Marker),
    /// Its marker for this plan was already there: nothing was redone.
    AlreadyDone(Marker),
}

/// Embeds shard `index` of `count` of the plan at `plan_path` into the dataset
/// directory `dataset` with `opts` (its `inputs` and `out` are replaced).
pub fn run_shard(
    opts: &EmbedOptions,
    plan_path: &Path,
    dataset: &Path,
    index: usize,
    count: usize,
) -> Result<ShardOutcome, String> {
    if count == 0 || index >= count {
        return Err(format!("shard index {index} of {count} shards (the index must be below the count)"));
    }
    let (plan, sha) = read_plan(plan_path)?;
    std::fs::create_dir_all(dataset).map_err(|e| format!("{}: {e}", dataset.display()))?;
    let marker = marker_path(dataset, index);
    if let Some(m) = read_marker(&marker)? {
        if m.plan_sha256 != sha || m.shard_count != count {
            return Err(format!(
                "{}: shard {index} was made from another plan or shard count (plan {} of {} shards; now {} of {count}): \
                 refusing to mix datasets",
                dataset.display(),
                &m.plan_sha256[..12],
                m.shard_count,
                &sha[..12]
            ));
        }
        return Ok(ShardOutcome::AlreadyDone(m));
    }
    // Any other shard's marker must be of this plan too.
    for e in std::fs::read_dir(dataset).map_err(|e| format!("{}: {e}", dataset.display()))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("_SUCCESS-") {
            if let Some(m) = read_marker(&e.path())? {
                if m.plan_sha256 != sha || m.shard_count != count {
                    return Err(format!(
                        "{}: {name} was made from another plan or shard count: the plan changed under the dataset",
                        dataset.display()
                    ));
                }
            }
        }
    }
    let inputs = shard_inputs(&plan, index, count);
    let mut summary = Summary::default();
    if !inputs.is_empty() {
        let mut o = opts.clone();
        o.out = part_path(dataset, index);
        o.planned = Some(inputs);
        o.band_groups = plan.band_groups;
        summary = crate::embed::run(&o)?;
    }
    let m = Marker {
        plan_sha256: sha,
        shard_index: index,
        shard_count: count,
        rows: summary.rows,
        files: summary.files,
        nodata_windows: summary.nodata_windows,
        failed: summary.skipped_files,
    };
    write_atomic(&marker, &serde_json::to_vec_pretty(&m).map_err(|e| e.to_string())?)?;
    Ok(ShardOutcome::Done(m))
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verified {
    pub shards: usize,
    pub rows: usize,
    pub failed_inputs: Vec<String>,
}

/// Checks `dataset` against the plan: every shard has its marker (of this plan)
/// and part, the parts hold the rows the markers count, and no chip id occurs twice.
pub fn verify(plan_path: &Path, dataset: &Path) -> Result<Verified, String> {
    let (_, sha) = read_plan(plan_path)?;
    let mut markers = Vec::new();
    for e in std::fs::read_dir(dataset).map_err(|e| format!("{}: {e}", dataset.display()))?.flatten() {
        if e.file_name().to_string_lossy().starts_with("_SUCCESS-") {
            markers.push(read_marker(&e.path())?.ok_or_else(|| format!("{}: vanished", e.path().display()))?);
        }
    }
    let count =
        markers.first().map(|m| m.shard_count).ok_or_else(|| format!("{}: no finished shard", dataset.display()))?;
    if let Some(m) = markers.iter().find(|m| m.plan_sha256 != sha || m.shard_count != count) {
        return Err(format!("shard {} was made from another plan or shard count", m.shard_index));
    }
    let done: HashSet<usize> = markers.iter().map(|m| m.shard_index).collect();
    let missing: Vec<usize> = (0..count).filter(|i| !done.contains(i)).collect();
    if !missing.is_empty() {
        return Err(format!("{}: shard(s) {missing:?} of {count} have no success marker", dataset.display()));
    }
    let mut seen = HashSet::new();
    let mut rows = 0;
    let mut failed = Vec::new();
    markers.sort_by_key(|m| m.shard_index);
    for m in &markers {
        failed.extend(m.failed.iter().cloned());
        let part = part_path(dataset, m.shard_index);
        let ids = if m.rows == 0 && !part.exists() { Vec::new() } else { chip_ids(&part)? };
        if ids.len() != m.rows {
            return Err(format!("{}: {} rows; its marker counts {}", part.display(), ids.len(), m.rows));
        }
        for id in ids {
            if !seen.insert(id.clone()) {
                return Err(format!("chip id {id} occurs twice (again in {})", part.display()));
            }
        }
        rows += m.rows;
    }
    Ok(Verified { shards: count, rows, failed_inputs: failed })
}

fn chip_ids(part: &Path) -> Result<Vec<String>, String> {
    use arrow_array::{Array, StringArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let f = std::fs::File::open(part).map_err(|e| format!("{}: {e}", part.display()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(f)
        .and_then(|b| b.build())
        .map_err(|e| format!("{}: not readable: {e}", part.display()))?;
    let mut out = Vec::new();
    for b in reader {
        let b = b.map_err(|e| format!("{}: {e}", part.display()))?;
        let ids = b
            .column_by_name("chip_id")
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or_else(|| format!("{}: no chip_id column", part.display()))?;
        out.extend((0..ids.len()).map(|i| ids.value(i).to_string()));
    }
    Ok(out)
}
