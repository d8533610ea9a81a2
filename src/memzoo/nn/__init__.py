"""Small leaf modules and helpers shared by blocks and the decoder (imports only ``torch``, ``memzoo.ops``).

- :mod:`memzoo.nn.norms`: RMSNorm, per-head norms, scale-free normalisation.
- :mod:`memzoo.nn.product_key_router`: the product-key router of PKM / Memory+ and PEER (query → rows, weights).
- :mod:`memzoo.nn.activations`: ``swiglu(a, b) = silu(a) · b``, the gate of SwiGLU MLPs (fused on CPU).
- :mod:`memzoo.nn.checks`: argument checks that raise errors naming the bad value.
"""

from memzoo.nn.activations import swiglu
from memzoo.nn.norms import HeadNorm, RMSNorm, at_least_float32, rms_normalize
from memzoo.nn.product_key_router import ProductKeyRouter

__all__ = ["HeadNorm", "ProductKeyRouter", "RMSNorm", "at_least_float32", "rms_normalize", "swiglu"]
