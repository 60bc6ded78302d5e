"""Probe entry script: ``run`` sleeps for ``{"sleep": seconds}`` (at most 5 s), then answers.

Used to measure how long a health check waits while one long request is in flight.
"""

import json
import time

MAX_SLEEP_S = 5.0


def init():
    """Nothing to load."""


def run(raw_data):
    """Sleep as asked (bounded), then say how long."""
    seconds = min(max(float(json.loads(raw_data).get("sleep", 0.0)), 0.0), MAX_SLEEP_S)
    time.sleep(seconds)
    return {"slept": seconds}
