"""Benchmark entry script: the ONNX model behind init()/run(), as a user would write it.

The same file runs in our server's entry-script mode and in azureml-inference-server-http, so both
do the same work per request: parse the JSON body, ``session.run``, return label and probabilities.
"""

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort

session: Any = None
input_name = ""


def init():
    """Open ``$AZUREML_MODEL_DIR/model.onnx`` with onnxruntime's default session options."""
    global session, input_name
    path = os.path.join(os.environ["AZUREML_MODEL_DIR"], "model.onnx")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name


def run(raw_data):
    """``{"data": [[floats]]}`` in, ``{"label": [...], "probabilities": [[...]]}`` out."""
    data = np.asarray(json.loads(raw_data)["data"], dtype=np.float32)
    label, probabilities = session.run(None, {input_name: data})
    return {"label": label.tolist(), "probabilities": probabilities.tolist()}
