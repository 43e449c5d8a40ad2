"""Classifiers in Flax NNX. Every model maps images in [0, 1] to `(logits, latent)`.

The latent is the globally pooled feature vector just before the last linear layer: the
representation the method clusters (../shared/METHOD.md, stage 1). Models normalise their input
themselves, so attacks and purification always work in [0, 1] pixel space.

Training code treats a model as pure functions of its state: `split_model` gives a static graph
definition and two pytrees (parameters, batch statistics) and `apply_model` runs the network
from them, so jitted steps take and return plain pytrees.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from srdjax.checks import SrdjaxError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _normalise(x, mean, std):
    return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def _bn(features, rngs, dtype):
    # momentum 0.9: short CPU runs need the running statistics to catch up within a few hundred
    # steps; flax's default 0.99 leaves them stale after a quick run.
    return nnx.BatchNorm(features, momentum=0.9, dtype=dtype, rngs=rngs)


def _conv(cin, cout, k, rngs, dtype, stride=1):
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding="SAME", use_bias=False,
                    dtype=dtype, rngs=rngs)


def _stem_conv(conv: nnx.Conv, x):
    """A stride-1 SAME convolution of a few-channel input as one matmul over its k×k patches
    (im2col). Same parameters and result as `conv(x)`; XLA's CPU convolution is slow on 3-channel
    inputs (45% of the SmallCNN's forward time went to its stem), a [.., 27] × [27, C] product
    is not, and the input gradient attacks need is a cheap sum of shifted slices."""
    kernel = conv.kernel[...]
    k = kernel.shape[0]
    lo, hi = (k - 1) // 2, k // 2
    h, w = x.shape[1:3]
    dtype = conv.dtype or jnp.result_type(x, kernel)
    xp = jnp.pad(x.astype(dtype), ((0, 0), (lo, hi), (lo, hi), (0, 0)))
    cols = jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(k) for j in range(k)], -1)
    return cols @ kernel.reshape(-1, kernel.shape[-1]).astype(dtype)


def _max_pool_2x2(x):
    """2×2/2 max pooling (odd edges dropped, as `nnx.max_pool`'s VALID padding does) as a
    reshape and a max: XLA's CPU backend differentiates this 15% faster per training step
    than the reduce-window form, whose gradient is a select-and-scatter."""
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class ConvGroup(nnx.Module):
    """conv → max-pool → BN → GELU → conv → BN → GELU (the fast-CIFAR "airbench" block)."""

    def __init__(self, cin, cout, *, rngs, dtype=None):
        self.conv1 = _conv(cin, cout, 3, rngs, dtype)
        self.bn1 = _bn(cout, rngs, dtype)
        self.conv2 = _conv(cout, cout, 3, rngs, dtype)
        self.bn2 = _bn(cout, rngs, dtype)

    def __call__(self, x):
        x = self.conv1(x)
        x = _max_pool_2x2(x)
        x = nnx.gelu(self.bn1(x), approximate=True)
        return nnx.gelu(self.bn2(self.conv2(x)), approximate=True)


class SmallCNN(nnx.Module):
    """A ~0.3M-parameter CNN for CPU runs (widths 24-32-64-128 by default).

    Stem conv, three conv groups each halving the resolution, a global max pool (the latent),
    and a bias-free linear head whose output is scaled down, which keeps early logits small and
    training stable at high learning rates.
    """

    def __init__(self, num_classes=10, widths=(24, 32, 64, 128), *, rngs, dtype=None,
                 mean=CIFAR_MEAN, std=CIFAR_STD, head_scale=1 / 9):
        self.mean, self.std, self.head_scale = tuple(mean), tuple(std), head_scale
        self.stem = _conv(3, widths[0], 3, rngs, dtype)
        self.stem_bn = _bn(widths[0], rngs, dtype)
        self.groups = nnx.List([ConvGroup(widths[i], widths[i + 1], rngs=rngs, dtype=dtype)
                                for i in range(len(widths) - 1)])
        self.head = nnx.Linear(widths[-1], num_classes, use_bias=False, dtype=dtype, rngs=rngs)
        self.latent_dim = widths[-1]

    def __call__(self, x):
        x = _normalise(x, self.mean, self.std)
        x = nnx.gelu(self.stem_bn(_stem_conv(self.stem, x)), approximate=True)
        for group in self.groups:
            x = group(x)
        latent = jnp.max(x, axis=(1, 2)).astype(jnp.float32)
        return (self.head(latent) * self.head_scale).astype(jnp.float32), latent


class BasicBlock(nnx.Module):
    def __init__(self, cin, cout, stride, *, rngs, dtype=None):
        self.conv1 = _conv(cin, cout, 3, rngs, dtype, stride)
        self.bn1 = _bn(cout, rngs, dtype)
        self.conv2 = _conv(cout, cout, 3, rngs, dtype)
        self.bn2 = _bn(cout, rngs, dtype)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nnx.data(nnx.Sequential(_conv(cin, cout, 1, rngs, dtype, stride),
                                                    _bn(cout, rngs, dtype)))

    def __call__(self, x):
        out = nnx.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return nnx.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet18(nnx.Module):
    """ResNet-18. `stem="cifar"`: 3×3 conv, no pooling (32×32 inputs); `stem="imagenet"`: 7×7/2
    conv and 3×3/2 max pool (64 px and up). Latent: the 512-d global average pool."""

    def __init__(self, num_classes=10, width=64, stem="cifar", *, rngs, dtype=None,
                 mean=CIFAR_MEAN, std=CIFAR_STD):
        if stem not in ("cifar", "imagenet"):
            raise SrdjaxError(f"model.stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.mean, self.std, self.stem_kind = tuple(mean), tuple(std), stem
        k = 3 if stem == "cifar" else 7
        self.stem = _conv(3, width, k, rngs, dtype, 1 if stem == "cifar" else 2)
        self.stem_bn = _bn(width, rngs, dtype)
        blocks, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            for j in range(2):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(cin, cout, stride, rngs=rngs, dtype=dtype))
                cin = cout
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(cin, num_classes, dtype=dtype, rngs=rngs)
        self.latent_dim = cin

    def __call__(self, x):
        x = _normalise(x, self.mean, self.std)
        x = nnx.relu(self.stem_bn(self.stem(x)))
        if self.stem_kind == "imagenet":
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for block in self.blocks:
            x = block(x)
        latent = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
        return self.head(latent).astype(jnp.float32), latent


class WideBlock(nnx.Module):
    """Pre-activation block of Zagoruyko & Komodakis (2016)."""

    def __init__(self, cin, cout, stride, *, rngs, dtype=None):
        self.bn1 = _bn(cin, rngs, dtype)
        self.conv1 = _conv(cin, cout, 3, rngs, dtype, stride)
        self.bn2 = _bn(cout, rngs, dtype)
        self.conv2 = _conv(cout, cout, 3, rngs, dtype)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nnx.data(_conv(cin, cout, 1, rngs, dtype, stride))

    def __call__(self, x):
        o = nnx.relu(self.bn1(x))
        short = x if self.shortcut is None else self.shortcut(o)
        o = self.conv2(nnx.relu(self.bn2(self.conv1(o))))
        return o + short


class WideResNet(nnx.Module):
    """WRN-depth-width for 32×32 inputs; depth = 6n + 4. Latent: the global average pool."""

    def __init__(self, num_classes=10, depth=28, width=10, *, rngs, dtype=None,
                 mean=CIFAR_MEAN, std=CIFAR_STD):
        if (depth - 4) % 6 or depth < 10:
            raise SrdjaxError(f"model.depth must be 6n + 4 (10, 16, 22, 28, ...), got {depth}")
        n = (depth - 4) // 6
        self.mean, self.std = tuple(mean), tuple(std)
        widths = (16, 16 * width, 32 * width, 64 * width)
        self.stem = _conv(3, widths[0], 3, rngs, dtype)
        blocks, cin = [], widths[0]
        for i, cout in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(WideBlock(cin, cout, 2 if (i > 0 and j == 0) else 1,
                                        rngs=rngs, dtype=dtype))
                cin = cout
        self.blocks = nnx.List(blocks)
        self.bn = _bn(cin, rngs, dtype)
        self.head = nnx.Linear(cin, num_classes, dtype=dtype, rngs=rngs)
        self.latent_dim = cin

    def __call__(self, x):
        x = self.stem(_normalise(x, self.mean, self.std))
        for block in self.blocks:
            x = block(x)
        latent = jnp.mean(nnx.relu(self.bn(x)), axis=(1, 2)).astype(jnp.float32)
        return self.head(latent).astype(jnp.float32), latent


MODELS: dict[str, Callable[..., nnx.Module]] = {
    "small_cnn": SmallCNN,
    "resnet18": ResNet18,
    "wide_resnet": WideResNet,
}


def create_model(name: str, num_classes: int, seed: int, dtype=None, **kwargs) -> nnx.Module:
    """Build a model by its registry name with the config's keyword arguments."""
    if name not in MODELS:
        raise SrdjaxError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    try:
        return MODELS[name](num_classes, rngs=nnx.Rngs(seed), dtype=dtype, **kwargs)
    except TypeError as e:
        raise SrdjaxError(f"bad arguments for model {name!r}: {e}") from None


def split_model(model: nnx.Module):
    """(graphdef, params, batch_stats): the static structure and two pytrees of plain arrays.

    Plain arrays (`nnx.pure`), not Variable objects: NNX Variables carry the trace they were made
    in and refuse updates from another, which breaks `grad` inside `jit` over merged models."""
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return graphdef, nnx.as_pure(params), nnx.as_pure(batch_stats)


def apply_model(graphdef, params, batch_stats, x, *, train: bool = False):
    """Run the network as a pure function. Returns (logits, latent, new batch_stats); in eval
    mode the batch statistics come back unchanged."""
    model = nnx.merge(graphdef, params, batch_stats)
    if train:
        model.train()
    else:
        model.eval()
    logits, latent = model(x)
    new_stats = nnx.as_pure(nnx.state(model, nnx.BatchStat)) if train else batch_stats
    return logits, latent, new_stats


def count_params(params) -> int:
    return int(sum(p.size for p in jax.tree.leaves(params)))
