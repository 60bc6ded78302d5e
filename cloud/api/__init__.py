"""The operator REST API (``edgectl serve``): the operations of ``edgectl`` over HTTP, with OpenAPI."""

from cloud.api.app import create_app
from cloud.api.context import Services

__all__ = ["Services", "create_app"]
