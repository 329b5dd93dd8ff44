"""OptiQ core: model loading, fast CPU layers, sensitivity measurement, mixed-precision
weight and KV-cache quantization, evaluation.

Importing this package first preloads the system OpenBLAS (see :mod:`optiq.core.blas`),
so import it before ``mlx``.
"""

from .blas import preload_openblas

preload_openblas()

__version__ = "0.1.0"
