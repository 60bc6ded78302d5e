"""The scoring runtime that runs inside every module image (``python -m modules.scoring``).

Entry scripts import their helpers from here::

    from modules.scoring import get_model_path, rawhttp, ScoringRequest, ScoringResponse

Importing this package stays cheap (no aiohttp, no inference runtime).
"""

from modules.scoring.model_paths import ModelPathError, get_model_path
from modules.scoring.raw import ScoringRequest, ScoringResponse, rawhttp

__all__ = ["ModelPathError", "ScoringRequest", "ScoringResponse", "get_model_path", "rawhttp"]
