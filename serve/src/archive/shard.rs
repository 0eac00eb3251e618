//! Archive embedding at scale: plan once, embed shards anywhere, verify, redo what failed.
//!
//! Plans and datasets are [`Location`]s: local paths or object-store URLs.
//!
//! - [`make_plan`] freezes the resolved inputs (files, band groups, STAC items) into a sorted plan file; its
//!   SHA-256 identifies it.
//! - [`run_shard`] embeds shard `i` of `n` (inputs `k` with `k % n == i`) into a dataset directory or prefix:
//!   the part is made in a spool file, the plan is checked again (a plan that changed under the running shard
//!   is refused and nothing is published), then `part-{i:05}.parquet` is published atomically (a rename, or
//!   one upload that appears whole) and the success marker `_SUCCESS-{i:05}.json` (rows, inputs, parts, each
//!   failed input, plan hash) is written last. A run-level failure (credentials, a store unreachable through
//!   every retry, the model, the output) publishes nothing and is the shard's error, so a Kubernetes Job
//!   retries the index. A shard whose marker exists for the same plan is skipped; one without a marker is
//!   redone (same rows, same bytes); a marker of another plan is refused, so datasets never mix.
//! - [`retry_failed`] embeds exactly the inputs a finished shard's marker lists as failed into one more part
//!   of that shard, then rewrites the marker with what still failed.
//! - [`verify`] checks a dataset against its plan: every shard done, its parts hold the rows it counts, no
//!   chip id twice; it reports the inputs that failed. `embed verify` then writes the dataset's STAC
//!   Collection (`collection.json`, one `part-….item.json` per part: [`crate::archive::collection`]).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::archive::embed::{collect_inputs, EmbedOptions, Failure, Input, Summary};
use crate::archive::error::ArchiveError;
use crate::archive::geoparquet;
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
    /// Rows in all of the shard's parts.
    pub rows: usize,
    /// Inputs embedded.
    pub files: usize,
    pub nodata_windows: usize,
    /// The shard's parts (file names in the dataset), in the order written: the first run's, then one per
    /// `--retry-failed` that embedded rows. (Markers written before parts were listed have none: their
    /// part is `part-{index:05}.parquet` when they count rows.)
    #[serde(default)]
    pub parts: Vec<String>,
    /// Inputs that could not be embedded (none of their rows kept), each with the reason.
    #[serde(default)]
    pub failures: Vec<Failure>,
    /// Failures as older markers recorded them (reasons only, so they cannot be retried by input).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
}

impl Marker {
    /// The shard's part files.
    pub fn part_names(&self) -> Vec<String> {
        if self.parts.is_empty() && self.rows > 0 {
            return vec![part_name(self.shard_index, 0)];
        }
        self.parts.clone()
    }

    /// Every failure's reason.
    pub fn failure_reasons(&self) -> impl Iterator<Item = &String> {
        self.failures.iter().map(|f| &f.error).chain(self.failed.iter())
    }
}

/// `part-{index:05}.parquet`, then `part-{index:05}-retry{k}.parquet` for the `k`-th retry.
fn part_name(index: usize, k: usize) -> String {
    if k == 0 {
        format!("part-{index:05}.parquet")
    } else {
        format!("part-{index:05}-retry{k}.parquet")
    }
}

/// `dataset/part-{index:05}.parquet`: the first part of shard `index`.
pub fn part_path(dataset: &Location, index: usize) -> Location {
    dataset.join(&part_name(index, 0))
}

/// `dataset/_SUCCESS-{index:05}.json`.
pub fn marker_path(dataset: &Location, index: usize) -> Location {
    dataset.join(&format!("_SUCCESS-{index:05}.json"))
}

/// Resolves `inputs` (as `geossl-serve embed` does) into a sorted plan.
pub fn make_plan(inputs: &[String], band_groups: bool) -> Result<Plan, ArchiveError> {
    Ok(Plan { version: PLAN_VERSION, band_groups, inputs: collect_inputs(inputs, band_groups)? })
}

/// Saves `plan` as JSON at `at` (atomically); returns its SHA-256 and whether it was written. With
/// `keep_existing`, a plan already there is kept (written only if absent, so that concurrent planners agree
/// on the first) and its hash returned.
pub fn write_plan(plan: &Plan, at: &Location, keep_existing: bool) -> Result<(String, bool), ArchiveError> {
    let bytes = serde_json::to_vec_pretty(plan).map_err(ArchiveError::run)?;
    if at.write(&bytes, keep_existing).map_err(ArchiveError::run)? {
        return Ok((geossl_models::sha256_hex(&bytes), true));
    }
    Ok((read_plan(at)?.1, false))
}

/// Reads a plan and its SHA-256.
pub fn read_plan(at: &Location) -> Result<(Plan, String), ArchiveError> {
    let bytes =
        at.read().map_err(ArchiveError::run)?.ok_or_else(|| ArchiveError::Run(format!("plan {at}: not found")))?;
    let plan: Plan =
        serde_json::from_slice(&bytes).map_err(|e| ArchiveError::Run(format!("plan {at}: not a geossl plan: {e}")))?;
    if plan.version != PLAN_VERSION {
        return Err(ArchiveError::Run(format!(
            "plan {at}: version {} (this geossl reads {PLAN_VERSION})",
            plan.version
        )));
    }
    Ok((plan, geossl_models::sha256_hex(&bytes)))
}

/// The inputs of shard `index` of `count`: every `count`-th, from `index`.
pub fn shard_inputs(plan: &Plan, index: usize, count: usize) -> Vec<Input> {
    plan.inputs.iter().skip(index).step_by(count.max(1)).cloned().collect()
}

fn read_marker(at: &Location) -> Result<Option<Marker>, ArchiveError> {
    match at.read().map_err(ArchiveError::run)? {
        Some(b) => {
            serde_json::from_slice(&b).map(Some).map_err(|e| ArchiveError::Run(format!("{at}: unreadable marker: {e}")))
        }
        None => Ok(None),
    }
}

fn write_marker(at: &Location, m: &Marker) -> Result<(), ArchiveError> {
    at.write(&serde_json::to_vec_pretty(m).map_err(ArchiveError::run)?, false).map_err(ArchiveError::run)?;
    Ok(())
}

/// The markers in a dataset, by file name.
pub fn markers(dataset: &Location) -> Result<Vec<(String, Marker)>, ArchiveError> {
    if dataset.as_local().is_some_and(|p| !p.exists()) {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for loc in dataset.list().map_err(ArchiveError::run)? {
        let name = loc.file_name();
        if name.starts_with("_SUCCESS-") && name.ends_with(".json") {
            out.push((name, read_marker(&loc)?.ok_or_else(|| ArchiveError::Run(format!("{loc}: vanished")))?));
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

/// Embeds `inputs` with `opts` into a spool and checks that the plan at `plan_at` is still `sha`; returns
/// the summary and the spool (none when nothing was embedded: no part then).
fn embed_into_spool(
    opts: &EmbedOptions,
    inputs: Vec<Input>,
    band_groups: bool,
    part: &Location,
    plan_at: &Location,
    sha: &str,
    index: usize,
) -> Result<(Summary, Option<std::path::PathBuf>), ArchiveError> {
    let mut summary = Summary::default();
    let spool = part.spool(&format!("shard{index:05}"));
    if !inputs.is_empty() {
        let mut o = opts.clone();
        o.out = spool.clone();
        o.planned = Some(inputs);
        o.band_groups = band_groups;
        summary = crate::archive::embed::run(&o)?;
    }
    // The plan must still be the one this shard was made from.
    let refused = |why: String| {
        let _ = std::fs::remove_file(&spool);
        ArchiveError::Run(why)
    };
    match read_plan(plan_at) {
        Ok((_, now)) if now == sha => {}
        Ok((_, now)) => {
            return Err(refused(format!(
                "plan {plan_at} changed while shard {index} ran (was {}, now {}): its part is not published",
                &sha[..12],
                &now[..12]
            )))
        }
        Err(e) => return Err(refused(format!("{e} (it changed while shard {index} ran: its part is not published)"))),
    }
    // No rows, no part (verify expects none).
    if summary.rows == 0 {
        let _ = std::fs::remove_file(&spool);
        return Ok((summary, None));
    }
    Ok((summary, Some(spool)))
}

/// Embeds shard `index` of `count` of the plan at `plan_at` into the dataset `dataset` with `opts` (its
/// `inputs` and `out` are replaced).
pub fn run_shard(
    opts: &EmbedOptions,
    plan_at: &Location,
    dataset: &Location,
    index: usize,
    count: usize,
) -> Result<ShardOutcome, ArchiveError> {
    if count == 0 || index >= count {
        return Err(ArchiveError::Run(format!(
            "shard index {index} of {count} shards (the index must be below the count)"
        )));
    }
    let (plan, sha) = read_plan(plan_at)?;
    let other_plan = |what: &str, m: &Marker| {
        ArchiveError::Run(format!(
            "{dataset}: {what} was made from another plan or shard count (plan {} of {} shards; now {} of \
             {count}): refusing to mix datasets",
            m.plan_sha256.get(..12).unwrap_or(&m.plan_sha256),
            m.shard_count,
            &sha[..12]
        ))
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
    let inputs = shard_inputs(&plan, index, count);
    let (summary, spool) = embed_into_spool(opts, inputs, plan.band_groups, &part, plan_at, &sha, index)?;
    let mut parts = Vec::new();
    if let Some(spool) = spool {
        part.publish(&spool).map_err(ArchiveError::run)?;
        parts.push(part_name(index, 0));
    }
    let m = Marker {
        plan_sha256: sha,
        shard_index: index,
        shard_count: count,
        rows: summary.rows,
        files: summary.files,
        nodata_windows: summary.nodata_windows,
        parts,
        failures: summary.failed.clone(),
        failed: Vec::new(),
    };
    write_marker(&marker, &m)?;
    Ok(ShardOutcome::Done(m, summary))
}

/// Embeds again exactly the inputs that the finished shard `index` recorded as failed, into one more part
/// of the shard, and rewrites its marker (rows and inputs added, failures replaced by what failed again).
/// A shard that is not finished is refused (run it first); one without failures is left as it is.
pub fn retry_failed(
    opts: &EmbedOptions,
    plan_at: &Location,
    dataset: &Location,
    index: usize,
    count: usize,
) -> Result<ShardOutcome, ArchiveError> {
    let (plan, sha) = read_plan(plan_at)?;
    let marker = marker_path(dataset, index);
    let m = read_marker(&marker)?.ok_or_else(|| {
        ArchiveError::Run(format!("{dataset}: shard {index} has not finished (no {marker}); run it first"))
    })?;
    if m.plan_sha256 != sha || m.shard_count != count {
        return Err(ArchiveError::Run(format!("{marker} was made from another plan or shard count")));
    }
    if !m.failed.is_empty() {
        return Err(ArchiveError::Run(format!(
            "{marker} records its failures without their inputs (an older geossl): rerun the shard instead"
        )));
    }
    if m.failures.is_empty() {
        return Ok(ShardOutcome::AlreadyDone(m));
    }
    let wanted: HashSet<&str> = m.failures.iter().map(|f| f.input.as_str()).collect();
    let inputs: Vec<Input> =
        shard_inputs(&plan, index, count).into_iter().filter(|i| wanted.contains(i.path.as_str())).collect();
    let k = m.parts.len().max(usize::from(m.rows > 0));
    let part = dataset.join(&part_name(index, k));
    let (summary, spool) = embed_into_spool(opts, inputs, plan.band_groups, &part, plan_at, &sha, index)?;
    let mut parts = m.part_names();
    if let Some(spool) = spool {
        part.publish(&spool).map_err(ArchiveError::run)?;
        parts.push(part_name(index, k));
    }
    let again = Marker {
        rows: m.rows + summary.rows,
        files: m.files + summary.files,
        nodata_windows: m.nodata_windows + summary.nodata_windows,
        parts,
        failures: summary.failed.clone(),
        ..m
    };
    write_marker(&marker, &again)?;
    Ok(ShardOutcome::Done(again, summary))
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verified {
    pub shards: usize,
    pub rows: usize,
    /// Each failed input's reason (`embed --retry-failed` redoes them).
    pub failed_inputs: Vec<String>,
    /// Every part of the dataset (file names), in shard order.
    pub parts: Vec<String>,
}

/// Checks `dataset` against the plan: every shard has its marker (of this plan) and parts, the parts hold
/// the rows the markers count, and no chip id occurs twice.
pub fn verify(plan_at: &Location, dataset: &Location) -> Result<Verified, ArchiveError> {
    let (_, sha) = read_plan(plan_at)?;
    let mut markers: Vec<Marker> = markers(dataset)?.into_iter().map(|(_, m)| m).collect();
    let count = markers
        .first()
        .map(|m| m.shard_count)
        .ok_or_else(|| ArchiveError::Run(format!("{dataset}: no finished shard")))?;
    if let Some(m) = markers.iter().find(|m| m.plan_sha256 != sha || m.shard_count != count) {
        return Err(ArchiveError::Run(format!("shard {} was made from another plan or shard count", m.shard_index)));
    }
    let done: HashSet<usize> = markers.iter().map(|m| m.shard_index).collect();
    let missing: Vec<usize> = (0..count).filter(|i| !done.contains(i)).collect();
    if !missing.is_empty() {
        return Err(ArchiveError::Run(format!("{dataset}: shard(s) {missing:?} of {count} have no success marker")));
    }
    let mut seen = HashSet::new();
    let mut rows = 0;
    let mut failed = Vec::new();
    let mut parts = Vec::new();
    markers.sort_by_key(|m| m.shard_index);
    for m in &markers {
        failed.extend(m.failure_reasons().cloned());
        let mut ids = 0;
        for name in m.part_names() {
            let part = dataset.join(&name);
            parts.push(name);
            for id in geoparquet::chip_ids(&part)? {
                ids += 1;
                if !seen.insert(id.clone()) {
                    return Err(ArchiveError::Run(format!("chip id {id} occurs twice (again in {part})")));
                }
            }
        }
        if ids != m.rows {
            return Err(ArchiveError::Run(format!(
                "shard {}: its parts hold {ids} rows; its marker counts {}",
                m.shard_index, m.rows
            )));
        }
        rows += m.rows;
    }
    Ok(Verified { shards: count, rows, failed_inputs: failed, parts })
}
