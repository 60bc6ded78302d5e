"""The edge-module contract and the scoring runtime that runs inside every module image."""
