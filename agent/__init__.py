"""The device agent (``edge-agent``): keeps a device's modules as its signed desired state says.

Pure core (no I/O, time passed in):

- ``admission``: checks a desired-state message (schema, device, signature, generation, expiry);
- ``planner``: (desired, observed, images, restart books, now) → an ordered ``actions.Plan``;
- ``restart``: restart policies and capped exponential back-off;
- ``rollback``: whether a new generation became healthy in time, and whether to roll back;
- ``observed``: the values a runtime and the health prober hand to the planner.

``state`` keeps the durable ``AgentState`` (last applied, last known good, restart books) with
atomic writes. Runtimes, health probing, the MQTT link and the loop build on these.
"""
