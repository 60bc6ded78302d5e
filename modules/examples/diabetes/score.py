"""Entry script for the diabetes Ridge regression, written the way the Azure ML docs write them.

The scoring server calls ``init()`` once at start-up and ``run(raw_data)`` with the request body
(a JSON string like ``{"data": [[10 floats], ...]}``); ``run`` returns one prediction per row.
"""

import json
import os
from typing import Any

import joblib
import numpy as np

model: Any = None


def init():
    """Load the model from ``$AZUREML_MODEL_DIR/model.pkl``."""
    global model
    model_dir = os.getenv("AZUREML_MODEL_DIR")
    if not model_dir:
        raise RuntimeError("AZUREML_MODEL_DIR is not set: it must name the folder that holds model.pkl")
    model = joblib.load(os.path.join(model_dir, "model.pkl"))


def run(raw_data):
    """Predict the disease progression for each row of ``data``."""
    body = json.loads(raw_data)
    if not isinstance(body, dict) or "data" not in body:
        raise ValueError('request body must be a JSON object like {"data": [[10 numbers], ...]}')
    data = np.array(body["data"], dtype=np.float64)
    result = model.predict(data)
    return result.tolist()
