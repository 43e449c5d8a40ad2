"""srdjax: adversarial image purification by adaptive clustering of robust semantic
representations, in JAX.

    import srdjax
    purifier = srdjax.load_purifier("runs/cifar10_quick")
    clean = purifier(images)                 # jitted; images [N, H, W, 3] in [0, 1], checked
    clean = purifier.unchecked(images)       # the same without the checks (inside your jit)
    logits_fn = srdjax.load_defense("runs/cifar10_quick", classifier="robust")

The public names load lazily, so `import srdjax.xla_env` can set XLA flags before jax loads.
"""
import importlib

_PUBLIC = {
    "SrdjaxError": "srdjax.checks",
    "Purifier": "srdjax.purifier",
    "PurifyOptions": "srdjax.purifier",
    "load_defense": "srdjax.loading",
    "load_purifier": "srdjax.loading",
    "purify": "srdjax.purifier",
    "purify_bpda": "srdjax.purifier",
    "purify_unchecked": "srdjax.purifier",
}
__all__ = list(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'srdjax' has no attribute {name!r}")
