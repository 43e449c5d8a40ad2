"""srdjax: adversarial image purification by adaptive clustering of robust semantic
representations, in JAX.

    import srdjax
    purifier = srdjax.load_purifier("runs/cifar10_quick")
    clean = purifier(images)                 # jitted; images [N, H, W, 3] in [0, 1]
    logits_fn = srdjax.load_defense("runs/cifar10_quick", classifier="robust")
"""
from srdjax.checks import SrdjaxError
from srdjax.purifier import (Purifier, PurifyOptions, load_defense, load_purifier, purify,
                             purify_bpda)

__all__ = ["SrdjaxError", "Purifier", "PurifyOptions", "load_defense", "load_purifier",
           "purify", "purify_bpda"]
