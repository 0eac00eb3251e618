//! geossl serving: ONNX Runtime sessions behind an HTTP API (Open Inference
//! Protocol v2 + image endpoints) and archive embedding (GeoTIFF → GeoParquet).
//! Never links libtorch. The server lands with issue #5.
