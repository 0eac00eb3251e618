//! The part of the STAC data model (<https://stacspec.org>, 1.0/1.1) that archive embedding reads: Items
//! and ItemCollections, their assets (href, media type, `bands` / `eo:bands`), links, bbox and datetime.
//! Every other field is kept untouched in `additional_fields`.
//!
//! Plain serde types rather than the `stac` crate: that crate makes CQL2 mandatory (a SQL parser, a
//! JSON-schema validator and a geometry engine: a fifth of a cold build of the workspace) for reading
//! these few fields. Documents geossl writes are validated against the specification by pystac in the
//! tests.

use indexmap::IndexMap;

use crate::archive::error::ArchiveError;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A STAC Item (a GeoJSON Feature).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bbox: Option<Vec<f64>>,
    #[serde(default)]
    pub properties: Properties,
    #[serde(default)]
    pub links: Vec<Link>,
    /// In document order: the first asset that has a band wins.
    #[serde(default)]
    pub assets: IndexMap<String, Asset>,
    #[serde(flatten)]
    pub additional_fields: Map<String, Value>,
}

/// An Item's properties: the acquisition time and everything else.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Properties {
    /// RFC 3339; null when the item gives a range (`start_datetime`/`end_datetime`).
    #[serde(default)]
    pub datetime: Option<String>,
    #[serde(flatten)]
    pub additional_fields: Map<String, Value>,
}

/// A link (`rel`, `href`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Link {
    pub rel: String,
    pub href: String,
    #[serde(flatten)]
    pub additional_fields: Map<String, Value>,
}

/// An asset: where the data is, its media type, and the bands it declares (STAC 1.1 `bands`, or the EO
/// extension's `eo:bands`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Asset {
    pub href: String,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bands: Vec<Value>,
    #[serde(rename = "eo:bands", default, skip_serializing_if = "Vec::is_empty")]
    pub eo_bands: Vec<Value>,
    #[serde(flatten)]
    pub additional_fields: Map<String, Value>,
}

impl Item {
    /// The link with relation `rel`, if any.
    pub fn link(&self, rel: &str) -> Option<&Link> {
        self.links.iter().find(|l| l.rel == rel)
    }

    /// The acquisition time as microseconds since 1970 (UTC): `datetime`, else `start_datetime`.
    pub fn datetime_micros(&self) -> Result<Option<i64>, ArchiveError> {
        let p = &self.properties;
        let s = p.datetime.as_deref().or_else(|| p.additional_fields.get("start_datetime").and_then(Value::as_str));
        s.map(|s| {
            chrono::DateTime::parse_from_rfc3339(s)
                .map(|d| d.timestamp_micros())
                .map_err(|e| ArchiveError::Input(format!("STAC item {}: datetime {s:?} is not RFC 3339: {e}", self.id)))
        })
        .transpose()
    }

    /// The centre of its bbox (lon, lat), when it has one (2D or 3D).
    pub fn bbox_center(&self) -> Option<(f64, f64)> {
        match self.bbox.as_deref()? {
            [x0, y0, x1, y1] | [x0, y0, _, x1, y1, _] => Some(((x0 + x1) / 2.0, (y0 + y1) / 2.0)),
            _ => None,
        }
    }
}

impl Asset {
    /// Each declared band's names (`name`, `common_name`, `eo:common_name`), in band order.
    pub fn band_names(&self) -> Vec<Vec<String>> {
        let names = |v: &Value| {
            ["name", "common_name", "eo:common_name"]
                .iter()
                .filter_map(|k| v.get(*k).and_then(Value::as_str).map(str::to_string))
                .collect::<Vec<_>>()
        };
        let declared = if self.bands.is_empty() { &self.eo_bands } else { &self.bands };
        declared.iter().map(names).collect()
    }
}

/// A STAC document that holds items.
#[derive(Deserialize)]
#[serde(tag = "type")]
enum Document {
    Feature(Item),
    FeatureCollection { features: Vec<Item> },
}

/// The items of a STAC Item or ItemCollection document (assets in document order); `doc` names it in errors.
pub fn items_of(doc: &str, bytes: &[u8]) -> Result<Vec<Item>, ArchiveError> {
    match serde_json::from_slice::<Document>(bytes) {
        Ok(Document::Feature(item)) => Ok(vec![item]),
        Ok(Document::FeatureCollection { features }) => Ok(features),
        Err(e) => {
            let kind = serde_json::from_slice::<Value>(bytes).ok().and_then(|v| v.get("type").cloned());
            Err(ArchiveError::Input(match kind {
                Some(Value::String(t)) if t == "Feature" || t == "FeatureCollection" => {
                    format!("{doc}: not a STAC {}: {e}", if t == "Feature" { "Item" } else { "ItemCollection" })
                }
                Some(other) => format!(
                    "{doc}: a STAC Item (\"type\": \"Feature\") or ItemCollection (\"FeatureCollection\") was \
                     expected, not {other}"
                ),
                None => format!("{doc}: not a STAC Item or ItemCollection: {e}"),
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_items_assets_bands_and_datetimes() {
        // Raw text: a serde_json::Value would sort the asset keys.
        let doc = r#"{
            "type": "FeatureCollection",
            "features": [{
                "type": "Feature", "stac_version": "1.1.0", "id": "a", "bbox": [10.0, 40.0, 12.0, 42.0],
                "geometry": null,
                "properties": { "datetime": "2020-05-18T10:00:00Z", "platform": "x" },
                "links": [{ "rel": "self", "href": "items/a.json" }],
                "assets": {
                    "visual": { "href": "v.tif", "type": "image/tiff", "eo:bands": [{ "name": "B04", "common_name": "red" }] },
                    "B08": { "href": "b8.tif", "bands": [{ "name": "B08" }] }
                }
            }, {
                "type": "Feature", "id": "b", "properties": { "datetime": null, "start_datetime": "1970-01-01T00:00:01Z" },
                "assets": {}
            }]
        }"#;
        let items = items_of("c.json", doc.as_bytes()).unwrap();
        assert_eq!(items.len(), 2);
        let a = &items[0];
        assert_eq!(a.assets.keys().collect::<Vec<_>>(), ["visual", "B08"], "document order");
        assert_eq!(a.assets["visual"].band_names(), [vec!["B04".to_string(), "red".into()]]);
        assert_eq!(a.assets["B08"].band_names(), [vec!["B08".to_string()]]);
        assert_eq!(a.datetime_micros().unwrap(), Some(1_589_796_000_000_000));
        assert_eq!(a.bbox_center(), Some((11.0, 41.0)));
        assert_eq!(a.link("self").map(|l| l.href.as_str()), Some("items/a.json"));
        assert_eq!(a.properties.additional_fields["platform"], "x");
        assert_eq!(items[1].datetime_micros().unwrap(), Some(1_000_000));
        let e = items_of("x.json", br#"{"type": "Collection"}"#).unwrap_err();
        assert!(e.is_input(), "a bad document skips its input: {e:?}");
        let e = e.to_string();
        assert!(e.contains("x.json") && e.contains("Collection"), "{e}");
        let bad = serde_json::json!({ "type": "Feature", "id": "z", "properties": { "datetime": "yesterday" } });
        let z = items_of("z.json", bad.to_string().as_bytes()).unwrap();
        let e = z[0].datetime_micros().unwrap_err();
        assert!(e.is_input() && e.to_string().contains("not RFC 3339"), "{e:?}");
    }
}
