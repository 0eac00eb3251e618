//! Archive embedding at scale: plan once, embed shards anywhere, verify.
//!
//! Plans and datasets are [`Location`]s: local paths or object-store URLs.
//!
//! - [`make_plan`] freezes the resolved inputs (files, band groups, STAC items)
//!   into a sorted plan file; its SHA-256 identifies it.
//! - [`run_shard`] embeds shard `i` of `n` (inputs `k` with `k % n == i`) into a
//!   dataset directory or prefix: the part is made in a spool file, the plan is
//!   checked again (a plan that changed under the running shard is refused and
//!   nothing is published), then `part-{i:05}.parquet` is published atomically
//!   (a rename, or one upload that appears whole) and the success marker
//!   `_SUCCESS-{i:05}.json` (rows, inputs, per-input failures, plan hash) is
//!   written last. A shard whose marker exists for the same plan is skipped; one
//!   without a marker is redone (same rows, same bytes); a marker of another plan
//!   is refused, so datasets of different plans are never mixed.
//! - [`verify`] checks a dataset against its plan: every shard done, no chip id twice.

use std::collections::HashSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::archive::embed::{collect_inputs, EmbedOptions, Input, Summary};
use crate::archive::store::Location;

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

/// One input of a plan: a file, a band group's files in band order, or a STAC item.
pub type PlanInput = Input;

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

/// `dataset/part-{index:05}.parquet`.
pub fn part_path(dataset: &Location, index: usize) -> Location {
    dataset.join(&format!("part-{index:05}.parquet"))
}

/// `dataset/_SUCCESS-{index:05}.json`.
pub fn marker_path(dataset: &Location, index: usize) -> Location {
    dataset.join(&format!("_SUCCESS-{index:05}.json"))
}

/// Resolves `inputs` (as `geossl-serve embed` does) into a sorted plan.
pub fn make_plan(inputs: &[String], band_groups: bool) -> Result<Plan, String> {
    Ok(Plan { version: PLAN_VERSION, band_groups, inputs: collect_inputs(inputs, band_groups)? })
}

/// Saves `plan` as JSON at `at` (atomically); returns its SHA-256 and whether
/// it was written. With `keep_existing`, a plan already there is kept (written
/// only if absent, so that concurrent planners agree on the first) and its hash returned.
pub fn write_plan(plan: &Plan, at: &Location, keep_existing: bool) -> Result<(String, bool), String> {
    let bytes = serde_json::to_vec_pretty(plan).map_err(|e| e.to_string())?;
    if at.write(&bytes, keep_existing)? {
        return Ok((geossl_models::sha256_hex(&bytes), true));
    }
    Ok((read_plan(at)?.1, false))
}

/// Reads a plan and its SHA-256.
pub fn read_plan(at: &Location) -> Result<(Plan, String), String> {
    let bytes = at.read()?.ok_or_else(|| format!("plan {at}: not found"))?;
    let plan: Plan = serde_json::from_slice(&bytes).map_err(|e| format!("plan {at}: not a geossl plan: {e}"))?;
    if plan.version != PLAN_VERSION {
        return Err(format!("plan {at}: version {} (this geossl reads {PLAN_VERSION})", plan.version));
    }
    Ok((plan, geossl_models::sha256_hex(&bytes)))
}

/// The inputs of shard `index` of `count`: every `count`-th, from `index`.
pub fn shard_inputs(plan: &Plan, index: usize, count: usize) -> Vec<Input> {
    plan.inputs.iter().skip(index).step_by(count.max(1)).cloned().collect()
}

fn read_marker(at: &Location) -> Result<Option<Marker>, String> {
    match at.read()? {
        Some(b) => serde_json::from_slice(&b).map(Some).map_err(|e| format!("{at}: unreadable marker: {e}")),
        None => Ok(None),
    }
}

/// The markers in a dataset, by file name.
fn markers(dataset: &Location) -> Result<Vec<(String, Marker)>, String> {
    if dataset.as_local().is_some_and(|p| !p.exists()) {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for loc in dataset.list()? {
        let name = loc.file_name();
        if name.starts_with("_SUCCESS-") && name.ends_with(".json") {
            out.push((name, read_marker(&loc)?.ok_or_else(|| format!("{loc}: vanished"))?));
        }
    }
    Ok(out)
}

/// How a shard ended.
#[derive(Debug, Clone, PartialEq)]
pub enum ShardOutcome {
    /// Embedded now.
    Done(Marker, Summary),
    /// Its marker for this plan was already there: nothing was redone.
    AlreadyDone(Marker),
}

/// Embeds shard `index` of `count` of the plan at `plan_at` into the dataset
/// `dataset` with `opts` (its `inputs` and `out` are replaced).
pub fn run_shard(
    opts: &EmbedOptions,
    plan_at: &Location,
    dataset: &Location,
    index: usize,
    count: usize,
) -> Result<ShardOutcome, String> {
    if count == 0 || index >= count {
        return Err(format!("shard index {index} of {count} shards (the index must be below the count)"));
    }
    let (plan, sha) = read_plan(plan_at)?;
    let other_plan = |what: &str, m: &Marker| {
        format!(
            "{dataset}: {what} was made from another plan or shard count (plan {} of {} shards; now {} of \
             {count}): refusing to mix datasets",
            m.plan_sha256.get(..12).unwrap_or(&m.plan_sha256),
            m.shard_count,
            &sha[..12]
        )
    };
    let marker = marker_path(dataset, index);
    if let Some(m) = read_marker(&marker)? {
        if m.plan_sha256 != sha || m.shard_count != count {
            return Err(other_plan(&format!("shard {index}"), &m));
        }
        return Ok(ShardOutcome::AlreadyDone(m));
    }
    // Any other shard's marker must be of this plan too.
    for (name, m) in markers(dataset)? {
        if m.plan_sha256 != sha || m.shard_count != count {
            return Err(other_plan(&name, &m));
        }
    }
    let part = part_path(dataset, index);
    // The part is made in a spool file: beside the dataset's parts (hidden) when it is local, in the
    // temporary directory when it is in an object store.
    let spool: PathBuf = match dataset.as_local() {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
            d.join(format!(".spool-{index:05}.parquet"))
        }
        None => std::env::temp_dir().join(format!("geossl-spool-{}-{index:05}.parquet", std::process::id())),
    };
    let inputs = shard_inputs(&plan, index, count);
    let mut summary = Summary::default();
    if !inputs.is_empty() {
        let mut o = opts.clone();
        o.out = spool.clone();
        o.planned = Some(inputs);
        o.band_groups = plan.band_groups;
        summary = crate::archive::embed::run(&o)?;
    }
    // The plan must still be the one this shard was made from.
    let publish = || -> Result<(), String> {
        match read_plan(plan_at) {
            Ok((_, now)) if now == sha => {}
            Ok((_, now)) => {
                return Err(format!(
                    "plan {plan_at} changed while shard {index} ran (was {}, now {}): its part is not published",
                    &sha[..12],
                    &now[..12]
                ))
            }
            Err(e) => return Err(format!("{e} (it changed while shard {index} ran: its part is not published)")),
        }
        // No spool when the shard had no inputs: no part (verify expects none for 0 rows).
        if spool.exists() {
            match dataset.as_local() {
                Some(_) => {
                    let to = part.as_local().ok_or("a local dataset has local parts")?;
                    std::fs::rename(&spool, to).map_err(|e| format!("{}: {e}", to.display()))?;
                }
                None => part.upload(&spool)?,
            }
        }
        Ok(())
    };
    let published = publish();
    let _ = std::fs::remove_file(&spool);
    published?;
    let m = Marker {
        plan_sha256: sha,
        shard_index: index,
        shard_count: count,
        rows: summary.rows,
        files: summary.files,
        nodata_windows: summary.nodata_windows,
        failed: summary.skipped_files.clone(),
    };
    marker.write(&serde_json::to_vec_pretty(&m).map_err(|e| e.to_string())?, false)?;
    Ok(ShardOutcome::Done(m, summary))
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
pub fn verify(plan_at: &Location, dataset: &Location) -> Result<Verified, String> {
    let (_, sha) = read_plan(plan_at)?;
    let mut markers: Vec<Marker> = markers(dataset)?.into_iter().map(|(_, m)| m).collect();
    let count = markers.first().map(|m| m.shard_count).ok_or_else(|| format!("{dataset}: no finished shard"))?;
    if let Some(m) = markers.iter().find(|m| m.plan_sha256 != sha || m.shard_count != count) {
        return Err(format!("shard {} was made from another plan or shard count", m.shard_index));
    }
    let done: HashSet<usize> = markers.iter().map(|m| m.shard_index).collect();
    let missing: Vec<usize> = (0..count).filter(|i| !done.contains(i)).collect();
    if !missing.is_empty() {
        return Err(format!("{dataset}: shard(s) {missing:?} of {count} have no success marker"));
    }
    let mut seen = HashSet::new();
    let mut rows = 0;
    let mut failed = Vec::new();
    markers.sort_by_key(|m| m.shard_index);
    for m in &markers {
        failed.extend(m.failed.iter().cloned());
        let part = part_path(dataset, m.shard_index);
        let ids = if m.rows == 0 && !part.exists()? { Vec::new() } else { chip_ids(&part)? };
        if ids.len() != m.rows {
            return Err(format!("{part}: {} rows; its marker counts {}", ids.len(), m.rows));
        }
        for id in ids {
            if !seen.insert(id.clone()) {
                return Err(format!("chip id {id} occurs twice (again in {part})"));
            }
        }
        rows += m.rows;
    }
    Ok(Verified { shards: count, rows, failed_inputs: failed })
}

/// The `chip_id` column of a part (only that column is read: a remote part by ranges).
fn chip_ids(part: &Location) -> Result<Vec<String>, String> {
    use arrow_array::{Array, StringArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::arrow::ProjectionMask;
    let builder = ParquetRecordBatchReaderBuilder::try_new(part.parquet_reader()?)
        .map_err(|e| format!("{part}: not readable: {e}"))?;
    let mask = ProjectionMask::columns(builder.parquet_schema(), ["chip_id"]);
    let reader = builder.with_projection(mask).build().map_err(|e| format!("{part}: not readable: {e}"))?;
    let mut out = Vec::new();
    for b in reader {
        let b = b.map_err(|e| format!("{part}: {e}"))?;
        let ids = b
            .column_by_name("chip_id")
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or_else(|| format!("{part}: no chip_id column"))?;
        out.extend((0..ids.len()).map(|i| ids.value(i).to_string()));
    }
    Ok(out)
}
