"""External validation of an exported ONNX model (used by geossl's tests).

Checks the file with onnx.checker.check_model(full_check=True), runs it in
Python onnxruntime (CPU) on `input` from --input (float32 safetensors; cast to
the model's input type: uint8, uint16 or float32), and writes every output to --out (safetensors).
"""
import argparse

import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import load_file, save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    onnx.checker.check_model(onnx.load(a.model), full_check=True)
    sess = ort.InferenceSession(a.model, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x = load_file(a.input)["input"]
    x = x.astype({"tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16}.get(inp.type, np.float32))
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(names, {inp.name: x})
    meta = sess.get_modelmeta().custom_metadata_map
    assert "geossl.spec" in meta and "geossl.source_sha256" in meta, meta
    save_file({n: np.ascontiguousarray(o.astype(np.float32)) for n, o in zip(names, outs)}, a.out)


if __name__ == "__main__":
    main()
