"""The diabetes entry script with ``inference_schema`` decorators, as in the Azure ML docs.

The decorators parse ``{"data": [[10 floats], ...]}`` into a float64 array (rejecting rows that do
not have 10 columns) and describe input and output for ``/swagger.json``.
"""

import os
from typing import Any

import joblib
import numpy as np
from inference_schema.parameter_types.numpy_parameter_type import NumpyParameterType
from inference_schema.schema_decorators import input_schema, output_schema

model: Any = None

# One row of scikit-learn's (mean-centred, scaled) diabetes features and a typical prediction.
input_sample = np.array([[0.0199, 0.0507, 0.1048, 0.0701, -0.036, -0.0267, -0.025, -0.0026, 0.0037, 0.0403]])
output_sample = np.array([233.7])


def init():
    """Load the model from ``$AZUREML_MODEL_DIR/model.pkl``."""
    global model
    model_dir = os.getenv("AZUREML_MODEL_DIR")
    if not model_dir:
        raise RuntimeError("AZUREML_MODEL_DIR is not set: it must name the folder that holds model.pkl")
    model = joblib.load(os.path.join(model_dir, "model.pkl"))


@input_schema("data", NumpyParameterType(input_sample))
@output_schema(NumpyParameterType(output_sample))
def run(data):
    """Predict the disease progression for each row of ``data`` (already a numpy array)."""
    result = model.predict(data)
    return result.tolist()
