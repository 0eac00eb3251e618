//! Minimal reader for NumPy `.npy` arrays of little-endian float32/float64/
//! uint8/uint16 (C order), e.g. Sentinel-2 time series exported from eo-learn.

use std::path::Path;

geossl_models::message_error!(
    /// A `.npy` file that cannot be read (named, with what is unsupported).
    NpyError
);

/// An array as f32 with its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Reads a `.npy` file; errors name the file and what is unsupported.
pub fn read_npy(path: &Path) -> Result<NpyArray, NpyError> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let err = |m: &str| NpyError(format!("{}: {m}", path.display()));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(err("not a .npy file"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(err(&format!("unsupported .npy version {v}"))),
    };
    let header = std::str::from_utf8(bytes.get(start..start + hlen).ok_or_else(|| err("truncated header"))?)
        .map_err(|_| err("header is not text"))?;
    let field = |key: &str| -> Option<&str> {
        let i = header.find(&format!("'{key}'"))? + key.len() + 2;
        Some(header[i..].trim_start_matches([':', ' ']))
    };
    let descr = field("descr").and_then(|s| s.split('\'').nth(1)).ok_or_else(|| err("no descr"))?;
    if field("fortran_order").is_some_and(|s| s.starts_with("True")) {
        return Err(err("Fortran-order arrays are not supported"));
    }
    let shape_s = field("shape")
        .and_then(|s| s.strip_prefix('('))
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| err("no shape"))?;
    let shape: Vec<usize> = shape_s
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| err("bad shape")))
        .collect::<Result<_, _>>()?;
    let n: usize = shape.iter().product();
    let body = &bytes[start + hlen..];
    let data: Vec<f32> = match descr {
        "<f4" => body.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        "<f8" => body
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        "|u1" => body.iter().map(|&b| b as f32).collect(),
        "<u2" => body.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as f32).collect(),
        d => return Err(err(&format!("unsupported dtype {d}"))),
    };
    if data.len() < n {
        return Err(err(&format!("truncated: {} values for shape {shape:?}", data.len())));
    }
    Ok(NpyArray { shape, data: data[..n].to_vec() })
}
