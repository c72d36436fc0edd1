"""The kernel: what every layer above may use, importing nothing else of ours.

- :mod:`lrustream.kernel.config`: the typed configuration (schema, defaults, checks).
- :mod:`lrustream.kernel.errors`: :class:`LrustreamError`, the root of every error we raise on purpose.
- :mod:`lrustream.kernel.kafka`: every Kafka client setting and the calls we make the same way everywhere
  (produce with a full queue, deliveries, metadata, admin).
- :mod:`lrustream.kernel.files`: durable file replacement.

The layers above it, lowest first, are enforced by import-linter (``pyproject.toml``): models | state, stream,
trainer, then the shell (``lrustream.cli`` and the harnesses) that nothing imports.
"""
