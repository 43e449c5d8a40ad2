import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srdjax.checks import SrdjaxError
from srdjax.models import apply_model, count_params, create_model, split_model


@pytest.mark.parametrize("name,kwargs,latent_dim", [
    ("small_cnn", {}, 128),
    ("small_cnn", {"widths": (8, 16, 32)}, 32),
    ("resnet18", {"width": 8}, 64),
    ("resnet18", {"width": 8, "stem": "imagenet"}, 64),
    ("wide_resnet", {"depth": 10, "width": 1}, 64),
])
def test_models_return_logits_and_pooled_latent(name, kwargs, latent_dim):
    graphdef, params, stats = split_model(create_model(name, 7, seed=0, **kwargs))
    x = jax.random.uniform(jax.random.key(0), (3, 32, 32, 3))
    logits, latent, new_stats = apply_model(graphdef, params, stats, x, train=True)
    assert logits.shape == (3, 7) and latent.shape == (3, latent_dim)
    assert logits.dtype == latent.dtype == jnp.float32
    # Training mode moves the BatchNorm statistics; eval mode leaves them alone.
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), stats, new_stats)
    assert max(jax.tree.leaves(moved)) > 0
    _, _, same = apply_model(graphdef, params, stats, x, train=False)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), stats, same))


def test_latent_is_the_input_of_the_last_linear_layer():
    model = create_model("resnet18", 10, seed=1, width=8)
    graphdef, params, stats = split_model(model)
    x = jax.random.uniform(jax.random.key(2), (4, 32, 32, 3))
    logits, latent, _ = apply_model(graphdef, params, stats, x)
    head = params["head"]
    np.testing.assert_allclose(logits, latent @ head["kernel"] + head["bias"], rtol=1e-5,
                               atol=1e-5)


def test_parameter_counts_match_the_architectures():
    assert count_params(split_model(create_model("resnet18", 10, 0))[1]) == 11_173_962
    assert count_params(split_model(create_model("small_cnn", 10, 0))[1]) == 295_480


def test_model_registry_errors_name_the_bad_value():
    with pytest.raises(SrdjaxError, match="unknown model 'vgg'"):
        create_model("vgg", 10, 0)
    with pytest.raises(SrdjaxError, match="6n \\+ 4"):
        create_model("wide_resnet", 10, 0, depth=12)
    with pytest.raises(SrdjaxError, match="bad arguments for model 'small_cnn'"):
        create_model("small_cnn", 10, 0, depth=3)


def test_fast_stem_conv_and_pool_equal_the_reference_ops():
    """The SmallCNN's im2col stem and reshape max-pool (CPU speed-ups) against `nnx.Conv` and
    `nnx.max_pool`: values and input gradients to float32 rounding (1e-5)."""
    from flax import nnx

    from srdjax.models import _max_pool_2x2, _stem_conv
    conv = nnx.Conv(3, 24, (3, 3), padding="SAME", use_bias=False, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(1), (4, 9, 11, 3))
    np.testing.assert_allclose(_stem_conv(conv, x), conv(x), atol=1e-5)
    g = jax.grad(lambda v: jnp.sum(jnp.sin(_stem_conv(conv, v))))(x)
    g_ref = jax.grad(lambda v: jnp.sum(jnp.sin(conv(v))))(x)
    np.testing.assert_allclose(g, g_ref, atol=1e-5)
    y = jax.random.normal(jax.random.key(2), (2, 9, 11, 5))
    np.testing.assert_array_equal(_max_pool_2x2(y), nnx.max_pool(y, (2, 2), strides=(2, 2)))
