"""The operator side: model registry, packaging, fleet rollout, REST API and the ``edgectl`` CLI."""
