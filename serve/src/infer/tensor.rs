//! Host tensors passed to and from the inference backends.

use crate::infer::InferError;

/// Element types the served models take or produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    U8,
    U16,
    F32,
}

impl DType {
    /// Name in the Open Inference Protocol (`UINT8`, `FP32`).
    pub fn oip_name(self) -> &'static str {
        match self {
            Self::U8 => "UINT8",
            Self::U16 => "UINT16",
            Self::F32 => "FP32",
        }
    }

    /// Parses an OIP datatype name.
    pub fn from_oip(s: &str) -> Option<Self> {
        match s {
            "UINT8" => Some(Self::U8),
            "UINT16" => Some(Self::U16),
            "FP32" => Some(Self::F32),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::U8 => 1,
            Self::U16 => 2,
            Self::F32 => 4,
        }
    }
}

/// Element storage.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    U8(Vec<u8>),
    U16(Vec<u16>),
    F32(Vec<f32>),
}

/// A dense row-major tensor; dimension 0 is the batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

impl Tensor {
    pub fn u8(shape: Vec<usize>, data: Vec<u8>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data: Data::U8(data) }
    }

    pub fn u16(shape: Vec<usize>, data: Vec<u16>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data: Data::U16(data) }
    }

    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data: Data::F32(data) }
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            Data::U8(_) => DType::U8,
            Data::U16(_) => DType::U16,
            Data::F32(_) => DType::F32,
        }
    }

    /// Batch size (dimension 0).
    pub fn batch(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            Data::U8(_) | Data::U16(_) => None,
        }
    }

    /// Concatenates tensors of equal dtype and trailing shape along dimension 0.
    pub fn concat(parts: &[&Tensor]) -> Result<Tensor, InferError> {
        let first = parts.first().ok_or_else(|| InferError::Backend("concat of no tensors".into()))?;
        let tail = &first.shape[1..];
        let mut n = 0;
        for p in parts {
            if p.shape[1..] != *tail || p.dtype() != first.dtype() {
                return Err(InferError::Backend("concat of tensors with different shapes or types".into()));
            }
            n += p.batch();
        }
        let mut shape = first.shape.clone();
        shape[0] = n;
        let data = match &first.data {
            Data::U8(_) => Data::U8(
                parts
                    .iter()
                    .flat_map(|p| if let Data::U8(v) = &p.data { v.as_slice() } else { &[] })
                    .copied()
                    .collect(),
            ),
            Data::U16(_) => Data::U16(
                parts
                    .iter()
                    .flat_map(|p| if let Data::U16(v) = &p.data { v.as_slice() } else { &[] })
                    .copied()
                    .collect(),
            ),
            Data::F32(_) => Data::F32(parts.iter().flat_map(|p| p.as_f32().unwrap_or(&[])).copied().collect()),
        };
        Ok(Tensor { shape, data })
    }

    /// Splits along dimension 0 into consecutive pieces of `sizes` rows.
    pub fn split(&self, sizes: &[usize]) -> Result<Vec<Tensor>, InferError> {
        if sizes.iter().sum::<usize>() != self.batch() {
            return Err(InferError::Backend(format!(
                "backend returned batch {} for {} rows",
                self.batch(),
                sizes.iter().sum::<usize>()
            )));
        }
        let row: usize = self.shape[1..].iter().product();
        let mut out = Vec::with_capacity(sizes.len());
        let mut at = 0;
        for &n in sizes {
            let mut shape = self.shape.clone();
            shape[0] = n;
            let data = match &self.data {
                Data::U8(v) => Data::U8(v[at * row..(at + n) * row].to_vec()),
                Data::U16(v) => Data::U16(v[at * row..(at + n) * row].to_vec()),
                Data::F32(v) => Data::F32(v[at * row..(at + n) * row].to_vec()),
            };
            out.push(Tensor { shape, data });
            at += n;
        }
        Ok(out)
    }

    /// Little-endian bytes (OIP binary tensor data).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match &self.data {
            Data::U8(v) => v.clone(),
            Data::U16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    /// Builds a tensor from little-endian bytes; `bytes.len()` must equal
    /// `shape.product() * dtype.size()`.
    pub fn from_le_bytes(shape: Vec<usize>, dtype: DType, bytes: &[u8]) -> Option<Tensor> {
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
        if bytes.len() != n.checked_mul(dtype.size())? {
            return None;
        }
        Some(match dtype {
            DType::U8 => Tensor::u8(shape, bytes.to_vec()),
            DType::U16 => Tensor::u16(shape, bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()),
            DType::F32 => Tensor::f32(
                shape,
                bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concat_then_split_round_trips() {
        let a = Tensor::f32(vec![1, 2], vec![1.0, 2.0]);
        let b = Tensor::f32(vec![2, 2], vec![3.0, 4.0, 5.0, 6.0]);
        let c = Tensor::concat(&[&a, &b]).unwrap();
        assert_eq!(c.shape, vec![3, 2]);
        assert_eq!(c.split(&[1, 2]).unwrap(), vec![a, b]);
        assert!(c.split(&[1, 1]).is_err());
    }

    #[test]
    fn le_bytes_round_trip_and_length_check() {
        let t = Tensor::f32(vec![2], vec![1.5, -f32::MAX]);
        assert_eq!(Tensor::from_le_bytes(vec![2], DType::F32, &t.to_le_bytes()), Some(t));
        assert_eq!(Tensor::from_le_bytes(vec![3], DType::F32, &[0; 8]), None);
        assert_eq!(Tensor::from_le_bytes(vec![usize::MAX, 2], DType::F32, &[0; 8]), None);
        let u = Tensor::u16(vec![3], vec![0, 2047, 65535]);
        assert_eq!(Tensor::from_le_bytes(vec![3], DType::U16, &u.to_le_bytes()), Some(u.clone()));
        let both = Tensor::concat(&[&u, &u]).unwrap();
        assert_eq!(both.split(&[3, 3]).unwrap(), vec![u.clone(), u]);
    }
}
