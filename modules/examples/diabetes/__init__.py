"""The diabetes example: an entry-script module (Ridge regression on ``load_diabetes``).

``score.py`` reads the JSON body itself; ``score_schema.py`` is the same model behind
``inference_schema`` decorators. Both are copied next to the model by ``build_diabetes_model``.
"""

from modules.examples.diabetes.build import build_diabetes_model

__all__ = ["build_diabetes_model"]
