"""OIP v2 conformance: an unmodified Triton HTTP client (tritonclient[http],
PyPI) talks to geossl-serve, with JSON and with binary tensors; outputs are
compared with Python onnxruntime on the same model file. Prints one JSON
object: max |served - reference| per (encoding, output), plus checks.
"""
import argparse
import json

import numpy as np
import onnxruntime as ort
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True, help="host:port")
    ap.add_argument("--model", required=True)
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--batch", type=int, default=2)
    a = ap.parse_args()

    c = httpclient.InferenceServerClient(url=a.url)
    assert c.is_server_live(), "server not live"
    assert c.is_server_ready(), "server not ready"
    assert c.is_model_ready(a.model), "model not ready"
    server = c.get_server_metadata()
    md = c.get_model_metadata(a.model)
    inp = md["inputs"][0]
    shape = [a.batch] + [64 if d < 0 else d for d in inp["shape"][1:]]
    rng = np.random.default_rng(0)
    if inp["datatype"] == "UINT8":
        x = rng.integers(0, 256, size=shape, dtype=np.uint8)
    else:
        x = rng.standard_normal(size=shape).astype(np.float32)
    sess = ort.InferenceSession(a.onnx, providers=["CPUExecutionProvider"])
    names = [o["name"] for o in md["outputs"]]
    ref = dict(zip(names, sess.run(names, {inp["name"]: x})))

    errors = {}
    for binary in (False, True):
        i = httpclient.InferInput(inp["name"], list(x.shape), inp["datatype"])
        i.set_data_from_numpy(x, binary_data=binary)
        outs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in names]
        r = c.infer(a.model, [i], outputs=outs, request_id="conformance-1")
        assert r.get_response()["id"] == "conformance-1", r.get_response()
        for n in names:
            got = r.as_numpy(n)
            assert got.shape == ref[n].shape, (n, got.shape, ref[n].shape)
            errors[f"{'binary' if binary else 'json'}:{n}"] = float(np.max(np.abs(got - ref[n])))
    # No outputs named: the server returns all of them.
    i = httpclient.InferInput(inp["name"], list(x.shape), inp["datatype"])
    i.set_data_from_numpy(x, binary_data=True)
    r = c.infer(a.model, [i], model_version="1")
    for n in names:
        errors[f"default:{n}"] = float(np.max(np.abs(r.as_numpy(n) - ref[n])))

    unknown = None
    try:
        c.infer("no-such-model", [i])
    except InferenceServerException as e:
        unknown = str(e)
    print(json.dumps({"errors": errors, "server": server["name"], "unknown_model_error": unknown}))


if __name__ == "__main__":
    main()
