"""Mixed-precision weight quantization by measured layer sensitivity (``optiq convert``).

See :func:`optiq.core.quant.convert.convert` and docs/convert.md.
"""

from .convert import ConvertResult, LayerResult, convert, read_metadata

__all__ = ["ConvertResult", "LayerResult", "convert", "read_metadata"]
