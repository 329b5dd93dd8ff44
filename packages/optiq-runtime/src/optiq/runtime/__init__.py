"""OptiQ runtime: the gRPC generation service.

``optiq.runtime.server`` runs a model behind ``optiq.v1.GenerationService``
(continuous batching on one generation thread, health, reflection, auth, TLS);
``optiq.runtime.client`` talks to it without importing MLX.
"""

__version__ = "0.1.0"
