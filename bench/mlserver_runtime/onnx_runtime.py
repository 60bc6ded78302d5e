"""A minimal onnxruntime runtime for MLServer, as a user would write one (bench row (d)).

MLServer has no onnxruntime runtime of its own; this is the shortest faithful one: the session
with onnxruntime's default options, the first input decoded with MLServer's NumpyCodec, every
output encoded back. ``model-settings.json`` names it as ``onnx_runtime.OnnxRuntime``.
"""

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        self.session = ort.InferenceSession(self.settings.parameters.uri, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        outputs = self.session.run(self.output_names, {self.input_name: x})
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output(n, a) for n, a in zip(self.output_names, outputs, strict=True)],
        )
