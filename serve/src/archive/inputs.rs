//! What an archive run embeds: inputs resolved from paths, directories, globs,
//! object-store prefixes and STAC Items/ItemCollections, and, per input, the
//! files and bands that feed the model.
//!
//! - A GeoTIFF (local path or URL) is one input.
//! - A directory or an object-store prefix (`s3://bucket/scenes/`) is searched
//!   recursively for `.tif`/`.tiff`; with band groups, each directory (prefix)
//!   holding GeoTIFFs is one input whose files are its bands, sorted by name.
//! - A local glob (`/data/*/T33*.tif`) names files.
//! - A STAC Item or ItemCollection (`.json`, local or URL) gives one input per
//!   item; its assets are picked by the model's band names when it is embedded
//!   (asset keys, `eo:bands`/`bands` names and common names), so a plan does
//!   not depend on the model.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use crate::archive::error::ArchiveError;
use crate::archive::store::{is_url, Location};

/// One input: a GeoTIFF, a band group (a directory whose GeoTIFFs are its
/// bands), or a STAC item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// The file, directory or URL as found (for a STAC item: `collection#id`).
    pub path: String,
    /// Its files in band order (none for a STAC item: picked when embedded).
    pub files: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stac: Option<StacRef>,
}

/// A STAC item within a JSON document (an Item or an ItemCollection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StacRef {
    pub document: String,
    pub id: String,
}

/// What an input resolves to for a model.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Recorded in every row as `source`.
    pub source: String,
    pub files: Vec<Location>,
    /// Band indices into the files' bands (in order), when fixed by the input (STAC).
    pub bands: Option<Vec<usize>>,
    /// Bands each file must have, when the input says (STAC `eo:bands`).
    pub band_counts: Option<Vec<usize>>,
    /// Fallback names of single-band files (`…_B04.tif` → `B04`).
    pub file_band_names: Vec<String>,
    /// Microseconds since 1970 (UTC), when the input says (STAC).
    pub datetime: Option<i64>,
}

fn canonical(s: &str) -> String {
    if is_url(s) {
        return s.to_string();
    }
    std::fs::canonicalize(s).map(|p| p.display().to_string()).unwrap_or_else(|_| s.to_string())
}

fn is_tiff_name(s: &str) -> bool {
    geossl_raster::is_tiff_path(Path::new(s))
}

fn is_json_name(s: &str) -> bool {
    let s = s.split(['?', '#']).next().unwrap_or(s);
    s.to_ascii_lowercase().ends_with(".json") || s.to_ascii_lowercase().ends_with(".geojson")
}

fn has_glob(s: &str) -> bool {
    !is_url(s) && s.contains(['*', '?', '['])
}

/// GeoTIFFs among `files` → inputs: each alone, or each directory's (prefix's) GeoTIFFs as one band group.
fn from_files(files: Vec<Location>, band_groups: bool, out: &mut Vec<Input>) {
    let files: Vec<Location> = files.into_iter().filter(|f| is_tiff_name(f.as_str())).collect();
    if !band_groups {
        out.extend(files.iter().map(|f| Input::file(canonical(f.as_str()))));
        return;
    }
    let mut groups: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for f in files {
        let s = canonical(f.as_str());
        let dir = s.rsplit_once('/').map(|(d, _)| d.to_string()).unwrap_or_default();
        groups.entry(dir).or_default().push(s);
    }
    out.extend(groups.into_iter().map(|(path, mut files)| {
        files.sort();
        Input { path, files, stac: None }
    }));
}

/// Resolves `inputs` into a sorted, deduplicated list. Any failure here is run-level: the inputs a run was
/// asked for could not be listed.
pub fn collect_inputs(inputs: &[String], band_groups: bool) -> Result<Vec<Input>, ArchiveError> {
    let mut out = Vec::new();
    for s in inputs {
        if is_json_name(s) {
            out.extend(
                stac_inputs(&Location::parse(s).map_err(ArchiveError::run)?)
                    .map_err(|e| ArchiveError::Run(e.to_string()))?,
            );
        } else if is_url(s) {
            if is_tiff_name(s) {
                // Not opened now: an unreachable or unauthorized file fails alone when it is embedded.
                out.push(Input::file(s.clone()));
            } else {
                let loc = Location::parse(s).map_err(ArchiveError::run)?;
                let listed = loc.list().map_err(ArchiveError::run)?;
                if listed.is_empty() {
                    return Err(ArchiveError::Run(format!("{s}: no objects under this prefix")));
                }
                from_files(listed, band_groups, &mut out);
            }
        } else if has_glob(s) && !Path::new(s).exists() {
            let mut files = Vec::new();
            for p in glob::glob(s).map_err(|e| ArchiveError::Run(format!("{s}: not a valid pattern: {e}")))? {
                files.push(Location::local(&p.map_err(|e| ArchiveError::Run(format!("{s}: {e}")))?));
            }
            if files.is_empty() {
                return Err(ArchiveError::Run(format!("{s}: the pattern matches no file")));
            }
            from_files(files, band_groups, &mut out);
        } else {
            let p = Path::new(s);
            if p.is_dir() {
                from_files(Location::local(p).list().map_err(ArchiveError::run)?, band_groups, &mut out);
            } else if p.is_file() {
                // A file named on its own is an input whatever its extension.
                out.push(Input::file(canonical(s)));
            } else {
                return Err(ArchiveError::Run(format!("{s}: no such file or directory")));
            }
        }
    }
    if out.is_empty() {
        return Err(ArchiveError::Run("no GeoTIFF (.tif/.tiff) or STAC item found in the inputs".into()));
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out.dedup();
    Ok(out)
}

/// A STAC document's items (parsed once per process).
fn stac_items(doc: &Location) -> Result<Arc<Vec<crate::archive::stac::Item>>, ArchiveError> {
    static DOCS: OnceLock<Mutex<HashMap<String, Arc<Vec<crate::archive::stac::Item>>>>> = OnceLock::new();
    let docs = DOCS.get_or_init(Default::default);
    if let Some(items) = docs.lock().unwrap_or_else(|e| e.into_inner()).get(doc.as_str()) {
        return Ok(items.clone());
    }
    let bytes =
        doc.read().map_err(ArchiveError::reading)?.ok_or_else(|| ArchiveError::Input(format!("{doc}: not found")))?;
    let items = Arc::new(crate::archive::stac::items_of(doc.as_str(), &bytes)?);
    docs.lock().unwrap_or_else(|e| e.into_inner()).insert(doc.as_str().to_string(), items.clone());
    Ok(items)
}

fn stac_inputs(doc: &Location) -> Result<Vec<Input>, ArchiveError> {
    let items = stac_items(doc)?;
    if items.is_empty() {
        return Err(ArchiveError::Input(format!("{doc}: no items")));
    }
    let document = canonical(doc.as_str());
    Ok(items
        .iter()
        .map(|i| Input {
            path: format!("{document}#{}", i.id),
            files: Vec::new(),
            stac: Some(StacRef { document: document.clone(), id: i.id.clone() }),
        })
        .collect())
}

impl Input {
    /// One GeoTIFF (a path or URL) as an input.
    pub fn file(path: String) -> Input {
        Input { files: vec![path.clone()], path, stac: None }
    }

    /// The files (and, for a STAC item, bands) of this input for a model taking `wanted` bands.
    pub fn resolve(&self, wanted: &[String]) -> Result<Resolved, ArchiveError> {
        let Some(s) = &self.stac else {
            let files = self
                .files
                .iter()
                .map(|f| Location::parse(f))
                .collect::<Result<Vec<_>, _>>()
                .map_err(ArchiveError::reading)?;
            return Ok(Resolved {
                source: canonical(&self.path),
                file_band_names: self.files.iter().map(|f| geossl_raster::band_name_from_file(f)).collect(),
                files,
                bands: None,
                band_counts: None,
                datetime: None,
            });
        };
        let doc = Location::parse(&s.document).map_err(ArchiveError::reading)?;
        let items = stac_items(&doc)?;
        let item = items
            .iter()
            .find(|i| i.id == s.id)
            .ok_or_else(|| ArchiveError::Input(format!("{}: the document no longer has item {}", s.document, s.id)))?;
        // Relative hrefs resolve against the item's own location where it gives one.
        let base = match item.link("self") {
            Some(l) => doc.resolve(&l.href).map_err(ArchiveError::reading)?,
            None => doc.clone(),
        };
        let mut used: Vec<&str> = Vec::new(); // asset keys in order of first use
        let mut picks: Vec<(usize, usize)> = Vec::new(); // (asset, band within it)
        for w in wanted {
            let mut found = None;
            for (key, a) in &item.assets {
                let declared = a.band_names();
                if let Some(b) = declared.iter().position(|names| names.iter().any(|n| n.eq_ignore_ascii_case(w))) {
                    found = Some((key.as_str(), b));
                    break;
                }
                if key.eq_ignore_ascii_case(w) && declared.len() <= 1 {
                    found = Some((key.as_str(), 0));
                    break;
                }
            }
            let Some((key, b)) = found else {
                let have: Vec<String> = item
                    .assets
                    .iter()
                    .filter(|(_, a)| a.media_type.as_deref().is_none_or(|t| t.contains("tiff")))
                    .map(|(k, a)| {
                        let names: Vec<String> =
                            a.band_names().into_iter().filter_map(|n| n.into_iter().next()).collect();
                        if names.is_empty() {
                            k.clone()
                        } else {
                            format!("{k} [{}]", names.join(", "))
                        }
                    })
                    .collect();
                return Err(ArchiveError::Input(format!(
                    "STAC item {} ({}): no asset has band {w} (the model takes {}; the item's assets: {})",
                    s.id,
                    s.document,
                    wanted.join(", "),
                    have.join(", ")
                )));
            };
            let k = match used.iter().position(|u| *u == key) {
                Some(k) => k,
                None => {
                    used.push(key);
                    used.len() - 1
                }
            };
            picks.push((k, b));
        }
        let counts: Vec<usize> = used.iter().map(|k| item.assets[*k].band_names().len().max(1)).collect();
        let offsets: Vec<usize> = counts.iter().scan(0, |acc, &n| Some(std::mem::replace(acc, *acc + n))).collect();
        let files = used
            .iter()
            .map(|k| base.resolve(&item.assets[*k].href))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ArchiveError::reading)?;
        let self_href = item.link("self").map(|_| base.as_str().to_string());
        Ok(Resolved {
            source: self_href.unwrap_or_else(|| self.path.clone()),
            file_band_names: used.iter().map(|k| k.to_string()).collect(),
            files,
            bands: Some(picks.iter().map(|&(k, b)| offsets[k] + b).collect()),
            band_counts: Some(counts),
            datetime: item.datetime_micros()?,
        })
    }

    /// Where the input lies, when known without reading it (a STAC item's bbox centre: lon, lat).
    pub fn known_center(&self) -> Option<(f64, f64)> {
        let s = self.stac.as_ref()?;
        let items = stac_items(&Location::parse(&s.document).ok()?).ok()?;
        items.iter().find(|i| i.id == s.id)?.bbox_center()
    }
}
