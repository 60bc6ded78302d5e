"""Sample modules built from data bundled with scikit-learn (nothing is downloaded).

- ``digits``: a no-code ONNX classifier (``build_digits_onnx``);
- ``diabetes``: an Azure-ML-style entry script around a Ridge regression (``build_diabetes_model``).

Build them with ``python -m modules.examples build OUT_DIR``. This package needs scikit-learn and
skl2onnx (the ``dev``/``cloud`` extras); the scoring runtime never imports it.
"""

from modules.examples.diabetes import build_diabetes_model
from modules.examples.digits import build_digits_onnx

__all__ = ["build_diabetes_model", "build_digits_onnx"]
