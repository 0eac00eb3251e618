"""The server users would write instead of geossl-serve: FastAPI + onnxruntime,
one session, the same OIP binary-tensor infer route (so one load generator
drives both), blocking inference moved off the event loop. No batching.

    MODEL=model.onnx python -m uvicorn fastapi_server:app --port 8000
"""
import json
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

app = FastAPI()
sess = ort.InferenceSession(os.environ["MODEL"], providers=["CPUExecutionProvider"])
input_name = sess.get_inputs()[0].name
output_names = [o.name for o in sess.get_outputs()]


@app.get("/v2/health/ready")
def ready():
    return {"ready": True}


@app.post("/v2/models/{model}/infer")
async def infer(model: str, request: Request):
    body = await request.body()
    n = int(request.headers["inference-header-content-length"])
    head = json.loads(body[:n])
    t = head["inputs"][0]
    x = np.frombuffer(body[n:], dtype=np.uint8).reshape(t["shape"])
    outs = await run_in_threadpool(sess.run, output_names, {input_name: x})
    blobs = [np.ascontiguousarray(o, dtype=np.float32).tobytes() for o in outs]
    resp = {
        "model_name": model,
        "outputs": [
            {"name": name, "datatype": "FP32", "shape": list(o.shape), "parameters": {"binary_data_size": len(b)}}
            for name, o, b in zip(output_names, outs, blobs)
        ],
    }
    h = json.dumps(resp).encode()
    return Response(
        content=h + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(h))},
    )
