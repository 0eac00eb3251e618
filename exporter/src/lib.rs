//! geossl export: checkpoint directories (geossl's own, the paper's released
//! `.pth.tar`, torchvision state dicts) to ONNX, in pure Rust — this crate
//! never links libtorch. The ONNX writer and importers land with issue #4.
