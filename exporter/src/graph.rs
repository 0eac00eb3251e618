//! A small ONNX graph builder over the generated protobuf types.

use crate::onnx_pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto::dimension, type_proto, AttributeProto,
    GraphProto, NodeProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

/// A dimension of a graph input or output.
#[derive(Debug, Clone)]
pub enum D {
    Fixed(i64),
    Sym(String),
}

/// An attribute value.
#[derive(Debug, Clone)]
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
    Str(&'static str),
}

/// Collects nodes and initializers; names are made unique with a counter.
#[derive(Debug, Default)]
pub struct Graph {
    pub nodes: Vec<NodeProto>,
    pub initializers: Vec<TensorProto>,
    counter: usize,
}

impl Graph {
    /// A fresh value name with `prefix`.
    pub fn fresh(&mut self, prefix: &str) -> String {
        self.counter += 1;
        format!("{prefix}_{}", self.counter)
    }

    /// Adds an initializer of `dtype` with little-endian `raw` bytes and returns its name.
    fn init_raw(&mut self, name: &str, dims: &[i64], dtype: DataType, raw: Vec<u8>) -> String {
        self.initializers.push(TensorProto {
            name: Some(name.to_string()),
            dims: dims.to_vec(),
            data_type: Some(dtype as i32),
            raw_data: Some(raw),
            ..Default::default()
        });
        name.to_string()
    }

    /// Adds a float32 initializer `[dims]` and returns its name.
    pub fn init_f32(&mut self, name: &str, dims: &[i64], data: &[f32]) -> String {
        self.init_raw(name, dims, DataType::Float, data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    /// Adds a float16 initializer (from f32 data) and returns its name.
    pub fn init_f16(&mut self, name: &str, dims: &[i64], data: &[f32]) -> String {
        self.init_raw(name, dims, DataType::Float16, data.iter().flat_map(|x| f32_to_f16(*x).to_le_bytes()).collect())
    }

    /// Adds an int64 initializer and returns its name.
    pub fn init_i64(&mut self, name: &str, dims: &[i64], data: &[i64]) -> String {
        self.init_raw(name, dims, DataType::Int64, data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    /// Adds a node; returns the name of its (single) output, `out` or a fresh one.
    pub fn node(&mut self, op: &str, inputs: &[&str], attrs: &[(&str, Attr)], out: Option<&str>) -> String {
        let output = out.map(str::to_string).unwrap_or_else(|| self.fresh(&op.to_ascii_lowercase()));
        let attribute = attrs
            .iter()
            .map(|(name, a)| {
                let mut p = AttributeProto { name: Some(name.to_string()), ..Default::default() };
                match a {
                    Attr::Int(i) => {
                        p.i = Some(*i);
                        p.r#type = Some(AttributeType::Int as i32);
                    }
                    Attr::Ints(v) => {
                        p.ints = v.clone();
                        p.r#type = Some(AttributeType::Ints as i32);
                    }
                    Attr::Float(f) => {
                        p.f = Some(*f);
                        p.r#type = Some(AttributeType::Float as i32);
                    }
                    Attr::Str(v) => {
                        p.s = Some(v.as_bytes().to_vec());
                        p.r#type = Some(AttributeType::String as i32);
                    }
                }
                p
            })
            .collect();
        let name = self.fresh(op);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.clone()],
            name: Some(name),
            op_type: Some(op.to_string()),
            attribute,
            ..Default::default()
        });
        output
    }

    /// The finished graph with the given inputs and outputs.
    pub fn finish(self, name: &str, inputs: Vec<ValueInfoProto>, outputs: Vec<ValueInfoProto>) -> GraphProto {
        GraphProto {
            node: self.nodes,
            name: Some(name.to_string()),
            initializer: self.initializers,
            input: inputs,
            output: outputs,
            ..Default::default()
        }
    }
}

/// A tensor value description.
pub fn value_info(name: &str, elem: DataType, dims: &[D]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| crate::onnx_pb::tensor_shape_proto::Dimension {
            value: Some(match d {
                D::Fixed(v) => dimension::Value::DimValue(*v),
                D::Sym(s) => dimension::Value::DimParam(s.clone()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Round-to-nearest-even f32 → IEEE half bits.
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = m >> shift;
        let rem = m & ((1 << shift) - 1);
        let mid = 1 << (shift - 1);
        let round = (rem > mid || (rem == mid && half & 1 == 1)) as u32;
        return sign | (half + round) as u16;
    }
    let half = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    let round = (rem > 0x1000 || (rem == 0x1000 && half & 1 == 1)) as u32;
    sign | (half + round) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_round_trips_through_the_shared_decoder() {
        for x in [0.0f32, 1.0, -2.5, 65504.0, 1e-5, 1234.567, -0.000061035156] {
            let back = geossl_models::weights::f16_to_f32(f32_to_f16(x));
            assert!((back - x).abs() <= x.abs() * 1e-3 + 1e-7, "{x} -> {back}");
        }
        assert_eq!(f32_to_f16(1e6), 0x7c00);
    }
}
