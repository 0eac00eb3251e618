//! Minimal reader for NumPy `.npy` arrays of little-endian float32/float64/
//! uint8/uint16 (C order), e.g. Sentinel-2 time series exported from eo-learn,
//! and a writer of float32/int64 arrays (features handed to reference tools).

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

/// Values a `.npy` file can be written from.
pub trait NpyElement: Copy {
    /// NumPy's `descr` of the type.
    const DESCR: &'static str;
    fn le_bytes(self) -> Vec<u8>;
}

impl NpyElement for f32 {
    const DESCR: &'static str = "<f4";
    fn le_bytes(self) -> Vec<u8> {
        self.to_le_bytes().to_vec()
    }
}

impl NpyElement for i64 {
    const DESCR: &'static str = "<i8";
    fn le_bytes(self) -> Vec<u8> {
        self.to_le_bytes().to_vec()
    }
}

/// Writes `data` (C order, `shape`) as a version-1 `.npy` file.
pub fn write_npy<T: NpyElement>(path: &Path, shape: &[usize], data: &[T]) -> Result<(), NpyError> {
    let n: usize = shape.iter().product();
    if n != data.len() {
        return Err(NpyError(format!("{}: {} values for shape {shape:?}", path.display(), data.len())));
    }
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape_s = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '{}', 'fortran_order': False, 'shape': {shape_s}, }}", T::DESCR);
    // Magic (6) + version (2) + length (2) + header, padded with spaces to a multiple of 64, ending in \n.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    for v in data {
        bytes.extend(v.le_bytes());
    }
    std::fs::write(path, bytes).map_err(|e| NpyError(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_arrays_read_back_with_their_shape() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.npy");
        let x: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 1.0).collect();
        write_npy(&p, &[3, 4], &x).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!((10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize) % 64, 0, "header aligned to 64");
        assert_eq!(read_npy(&p).unwrap(), NpyArray { shape: vec![3, 4], data: x });
        write_npy(&p, &[2], &[7i64, -1]).unwrap();
        assert!(String::from_utf8_lossy(&std::fs::read(&p).unwrap()).contains("'shape': (2,)"));
        assert!(write_npy(&p, &[5], &[1.0f32]).unwrap_err().to_string().contains("1 values for shape [5]"));
    }
}
