"""Purification: the jitted function, its BPDA gradient, loading from a workdir, purify.py."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import srdjax
import srdjax.patches
from srdjax import clusters, parallel, purifier as pur
from srdjax.checks import SrdjaxError
from srdjax.frequency import split
from srdjax.models import apply_model, create_model, split_model
from tests.helpers import REPO, cifar_test_images


def _tiny_purifier(size=8, patch=4, stride=2, n_atoms=64, sparsity=3, dictionaries=None,
                   seed=0):
    """A purifier from a small random model, two clusters and random unit dictionaries."""
    graphdef, params, stats = split_model(create_model("small_cnn", 2, seed, widths=(4, 6)))
    rng = np.random.default_rng(seed)
    dim = patch * patch * 3
    cs = clusters.ClusterSet(
        means=jnp.asarray(rng.normal(size=(2, 6)), jnp.float32),
        stds=jnp.ones((2, 6), jnp.float32), class_ids=jnp.array([0, 1], jnp.int32),
        index_in_class=jnp.zeros(2, jnp.int32), counts=jnp.array([5, 5], jnp.int32))
    if dictionaries is None:
        d = rng.normal(size=(2, n_atoms, dim))
        dictionaries = d / np.linalg.norm(d, axis=-1, keepdims=True)
    options = pur.PurifyOptions(image_size=(size, size), patch_size=patch, stride=stride,
                                sparsity=sparsity, pad=4, image_chunk=3)
    return pur.make_purifier(graphdef, params, stats, cs,
                             jnp.asarray(dictionaries, jnp.float32), options)


def _images(n=5, size=8, seed=1):
    return jax.random.uniform(jax.random.key(seed), (n, size, size, 3), minval=0.2, maxval=0.8)


def test_purify_is_deterministic_and_keeps_shape_dtype_range():
    p, x = _tiny_purifier(), _images()
    a, k = p(x, return_cluster=True)
    b = srdjax.purify(p, x)
    assert a.shape == x.shape and a.dtype == x.dtype and k.shape == (5,) and k.dtype == jnp.int32
    np.testing.assert_array_equal(a, b)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert not np.allclose(a, x, atol=1e-3)  # random atoms cannot rebuild the high part


def test_image_chunk_zero_is_chosen_by_platform_and_purifies_the_same(monkeypatch):
    """image_chunk = 0 becomes 16 images on a CPU and ACCELERATOR_PATCHES' worth on a GPU/TPU
    (here patched: 8x8 images, 4x4 patches at stride 2 are 9 patches each); the chunking only
    bounds memory, so the purified images equal those of image_chunk = 3."""
    import dataclasses
    p, x = _tiny_purifier(), _images(n=20)
    auto = dataclasses.replace(p.options, image_chunk=0)

    def rebuilt():
        return pur.make_purifier(p.graphdef, p.params, p.batch_stats, p.clusters,
                                 p.dictionaries, auto)
    assert rebuilt().options.image_chunk == 16
    np.testing.assert_allclose(rebuilt()(x), p(x), atol=1e-6)
    monkeypatch.setattr(parallel, "on_accelerator", lambda: True)
    on_gpu = rebuilt()
    assert on_gpu.options.image_chunk == pur.ACCELERATOR_PATCHES // 9
    np.testing.assert_allclose(on_gpu(x), p(x), atol=1e-6)
    with pytest.raises(SrdjaxError, match="image_chunk must be a non-negative integer"):
        pur.make_purifier(p.graphdef, p.params, p.batch_stats, p.clusters, p.dictionaries,
                          dataclasses.replace(p.options, image_chunk=-1))


def test_a_complete_dictionary_rebuilds_the_image_exactly():
    """With the identity basis and sparsity = dim every patch is coded exactly, so purify is the
    identity: the low part passes through and the high part is rebuilt from the patches.
    Tolerance: like scikit-learn, OMP stops when the best remaining correlation² falls below
    machine epsilon, so float32 drops coefficients under sqrt(1.2e-7) ≈ 3.5e-4."""
    dim = 2 * 2 * 3      # 2×2 patches at stride 1 (overlapping): OMP unrolls only 12 steps
    eye = np.stack([np.eye(dim), np.eye(dim)])
    p, x = _tiny_purifier(patch=2, stride=1, n_atoms=dim, sparsity=dim, dictionaries=eye), _images()
    np.testing.assert_allclose(p(x), x, atol=3.5e-4)
    assert float(jnp.mean(jnp.abs(p(x) - x))) < 1e-5


def test_low_part_passes_through_unchanged():
    """Before the clip, purify(x) - rebuilt high part equals split(x).low (to one float32
    rounding of the subtraction). (The
    Tikhonov filter is not idempotent, so split(purify(x)).low itself differs from split(x).low
    by the low-pass of the rebuilt high part.)"""
    p, x = _tiny_purifier(), _images()
    low, high = split(x, lam=5.0, pad=4)
    k = pur.choose_cluster(p, x)
    patches = srdjax.patches._extract(high, 4, 2)
    support, values = pur._supports(p, k, patches)
    rebuilt_high = pur._rebuild(p, jnp.zeros_like(low), k, support, values, x.shape[1:])
    unclipped = pur._rebuild(p, low, k, support, values, x.shape[1:])
    np.testing.assert_allclose(unclipped - rebuilt_high, low, rtol=0, atol=1.2e-7)


def test_chosen_cluster_is_the_nearest_to_the_robust_latent():
    p, x = _tiny_purifier(), _images(n=6)
    _, k = p(x, return_cluster=True)
    z = np.asarray(p.latent(x))
    d = (((z[:, None] - np.asarray(p.clusters.means)[None]) / 1.0) ** 2).sum(-1)
    np.testing.assert_array_equal(k, d.argmin(1))


def test_sharded_over_two_devices_equals_one_device():
    p, x = _tiny_purifier(), _images(n=6)
    one = p(jax.device_put(x, jax.devices()[0]))
    mesh = parallel.make_mesh(jax.devices()[:2])
    sharded_x = parallel.shard_batch(mesh, np.asarray(x))
    two = p(sharded_x)
    assert len(two.sharding.device_set) == 2
    np.testing.assert_allclose(one, two, atol=1e-6)
    _, k_one = p(jax.device_put(x, jax.devices()[0]), return_cluster=True)
    _, k_two = p(sharded_x, return_cluster=True)
    np.testing.assert_array_equal(k_one, k_two)


def test_a_sharded_batch_is_purified_without_cross_device_traffic():
    """Each device purifies its own images: the compiled program has no collectives (under
    GSPMD both devices once gathered, and purified, the whole batch)."""
    p = _tiny_purifier()
    mesh = parallel.make_mesh(jax.devices()[:2])
    x = parallel.shard_batch(mesh, np.asarray(_images(n=6)))
    spec = x.sharding.spec
    hlo = pur._purify_per_device(mesh, spec, False).lower(p, x).compile().as_text()
    for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
        assert f" {op}(" not in hlo and f" {op}-start(" not in hlo, op


def test_purify_uint8_equals_purify_and_refuses_float_images():
    p, x = _tiny_purifier(), _images(n=5)
    u8 = np.round(np.asarray(x) * 255).astype(np.uint8)
    mesh = parallel.make_mesh(jax.devices()[:2])
    out, k = pur.purify_uint8(p, u8, mesh, batch_size=4)
    want, k_want = p(jnp.asarray(u8, jnp.float32) / 255.0, return_cluster=True)
    np.testing.assert_array_equal(k, k_want)
    assert out.dtype == np.uint8
    # within one level: float32 results of split and unsplit batches may differ in the last bit
    ref = np.round(np.asarray(want) * 255.0)
    assert np.abs(out.astype(np.float64) - ref).max() <= 1
    with pytest.raises(SrdjaxError, match="uint8"):
        pur.purify_uint8(p, np.asarray(x), mesh, batch_size=4)


def test_purify_is_callable_from_another_jitted_function():
    p, x = _tiny_purifier(), _images()

    @jax.jit
    def user_code(state, images):
        return jnp.mean(srdjax.purify(state, images * 0.5 + 0.25), axis=(1, 2, 3))

    np.testing.assert_allclose(user_code(p, x), jnp.mean(p(x * 0.5 + 0.25), axis=(1, 2, 3)),
                               atol=1e-6)


def _dense_low_pass(size, lam, pad):
    """The low-pass as a dense [n, n] matrix (columns: images of the basis vectors)."""
    n = size * size * 3
    basis = np.eye(n, dtype=np.float32).reshape(n, size, size, 3)
    low, _ = split(jnp.asarray(basis * 0.5 + 0.0), lam=lam, pad=pad)
    return np.asarray(low, np.float64).reshape(n, n).T * 2.0


def _patch_matrices(size, patch, stride):
    """E: image → stacked patches, R: stacked patches → overlap-averaged image (numpy)."""
    idx = np.arange(size * size * 3).reshape(size, size, 3)
    rows = []
    for r in range(0, size - patch + 1, stride):
        for c in range(0, size - patch + 1, stride):
            rows.append(idx[r:r + patch, c:c + patch].ravel())
    rows = np.concatenate(rows)
    e = np.zeros((len(rows), size * size * 3))
    e[np.arange(len(rows)), rows] = 1.0
    r_mat = e.T / e.sum(0)[:, None]
    return e, r_mat


@pytest.mark.parametrize("size,patch,stride", [(8, 4, 2), (9, 3, 2)])
def test_bpda_gradient_equals_the_hand_computed_one(size, patch, stride):
    """On small images: with cluster and supports fixed, purify is J x with
    J = L + R · blockdiag(P_S) · E · (I − L), P_S the projector onto each patch's selected
    atoms; the BPDA gradient of w · purify(x) must be Jᵀ w. (purify's backward pass is written
    out, not autodiff; 3 / 2: a stride that does not divide the patch, other overlap counts.)"""
    p, x = _tiny_purifier(size, patch, stride), _images(n=1, size=size, seed=3)
    w = np.asarray(jax.random.normal(jax.random.key(4), x.shape), np.float64)
    grad = jax.grad(lambda xx: jnp.sum(pur.purify_bpda(p, xx) * w))(x)

    low_m = _dense_low_pass(size, 5.0, 4)
    e, r_mat = _patch_matrices(size, patch, stride)
    _, high = split(x, lam=5.0, pad=4)
    k = int(pur.choose_cluster(p, x)[0])
    patches = srdjax.patches._extract(high, patch, stride)
    support, _ = pur._supports(p, jnp.array([k]), patches)
    dic = np.asarray(p.dictionaries[k], np.float64)
    dim = patch * patch * 3
    blocks = np.zeros((e.shape[0], e.shape[0]))
    for i, s in enumerate(np.asarray(support[0])):
        atoms = dic[s[s >= 0]]                                   # [k, dim]
        proj = atoms.T @ np.linalg.solve(atoms @ atoms.T, atoms)
        blocks[i * dim:(i + 1) * dim, i * dim:(i + 1) * dim] = proj
    n = size * size * 3
    jac = low_m + r_mat @ blocks @ e @ (np.eye(n) - low_m)
    expected = (jac.T @ w.reshape(-1)).reshape(x.shape)
    np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-4)


def test_bpda_forward_equals_purify():
    p, x = _tiny_purifier(), _images()
    np.testing.assert_array_equal(pur.purify_bpda(p, x), p(x))


def test_bad_inputs_get_one_clear_error():
    p = _tiny_purifier()
    x = np.asarray(_images())
    with pytest.raises(SrdjaxError, match="rank 4"):
        p(x[0])
    with pytest.raises(SrdjaxError, match="3 channels"):
        p(x[..., :2])
    with pytest.raises(SrdjaxError, match="floating point"):
        p((x * 255).astype(np.uint8))
    with pytest.raises(SrdjaxError, match=r"must lie in \[0, 1\]"):
        p(x * 3)
    with pytest.raises(SrdjaxError, match="NaN"):
        p(np.where(x > 0.5, np.nan, x))
    with pytest.raises(SrdjaxError, match="built for 8x8"):
        p(np.zeros((1, 16, 16, 3), np.float32))


# ------------------------------------------------------------------- from a train.py workdir

def test_load_purifier_and_defense_from_the_smoke_run(smoke_workdir):
    purifier = srdjax.load_purifier(smoke_workdir)
    x = jnp.asarray(cifar_test_images(8)[0], jnp.float32) / 255
    out, k = purifier(x, return_cluster=True)
    assert out.shape == x.shape and int(k.max()) < purifier.clusters.num_clusters
    defense = srdjax.load_defense(smoke_workdir, classifier="baseline")
    from srdjax import stages
    ctx = stages.Context(stages.load_config(smoke_workdir))
    graphdef, params, stats = stages.load_classifier(ctx, "baseline")
    np.testing.assert_allclose(defense(x), apply_model(graphdef, params, stats, out)[0],
                               rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda xx: defense(xx)[:, 0].sum())(x)
    assert g.shape == x.shape and float(jnp.abs(g).sum()) > 0
    with pytest.raises(SrdjaxError, match="classifier must be"):
        srdjax.load_defense(smoke_workdir, classifier="pgd")


def test_checkpoint_missing_a_stage_is_reported(tmp_path, smoke_workdir):
    import shutil
    shutil.copytree(smoke_workdir, tmp_path / "w")
    shutil.rmtree(tmp_path / "w" / "dictionaries")
    with pytest.raises(SrdjaxError, match="no finished 'dictionaries' stage"):
        srdjax.load_purifier(tmp_path / "w")
    with pytest.raises(SrdjaxError, match="not an srdjax checkpoint directory"):
        srdjax.load_purifier(tmp_path)


def _run_purify(*args):
    return subprocess.run([sys.executable, "purify.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_purify_py_writes_images_grid_and_table(tmp_path, smoke_workdir):
    from PIL import Image
    x, _ = cifar_test_images(4)
    folder = tmp_path / "in"
    folder.mkdir()
    for i, im in enumerate(x[:3]):
        Image.fromarray(im).save(folder / f"img{i}.png")
    np.savez(tmp_path / "more.npz", x=x[3:])
    out = tmp_path / "out"
    proc = _run_purify("--checkpoint", smoke_workdir, "--output", out, "--classify",
                       "--grid", tmp_path / "grid.png", folder, tmp_path / "more.npz")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["img0.png", "img1.png", "img2.png",
                                                     "more_00000.png"]
    assert np.asarray(Image.open(out / "img0.png")).shape == (32, 32, 3)
    assert (tmp_path / "grid.png").stat().st_size > 1000
    assert "baseline/purified" in proc.stdout and "img2" in proc.stdout


def test_purify_py_bad_inputs_leave_no_output(tmp_path, smoke_workdir):
    from PIL import Image
    (tmp_path / "bad.png").write_bytes(b"not an image")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(np.zeros((32, 32, 4), np.uint8)).save(tmp_path / "rgba.png")
    for inp, msg in ((tmp_path / "bad.png", "not a readable PNG/JPEG"),
                     (tmp_path / "small.png", "serves 32x32"),
                     (tmp_path / "rgba.png", "alpha channel"),
                     (tmp_path / "nope.png", "does not exist")):
        out = tmp_path / f"out_{inp.stem}"
        proc = _run_purify("--checkpoint", smoke_workdir, "--output", out, inp)
        assert proc.returncode == 2, proc.stderr
        assert msg in proc.stderr.strip().splitlines()[-1]
        assert not out.exists() or not any(out.iterdir())


def test_purify_py_on_two_processes_writes_what_one_process_writes(tmp_path, smoke_workdir):
    """purify.py under jax.distributed: two processes (one CPU device each) split every batch,
    process 0 alone writes; the images and the table equal a one-process run's."""
    from PIL import Image
    from tests.test_multihost import _env, _free_port
    x, _ = cifar_test_images(5)
    np.savez(tmp_path / "x.npz", x=x)
    one = _run_purify("--checkpoint", smoke_workdir, "--output", tmp_path / "one", "--classify",
                      "--batch-size", 4, tmp_path / "x.npz")
    assert one.returncode == 0, one.stderr
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "purify.py", "--checkpoint", str(smoke_workdir), "--output",
         str(tmp_path / "two"), "--classify", "--batch-size", "4", str(tmp_path / "x.npz"),
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "wrote 5 purified images" in outs[0][0] and "2 device(s)" in outs[0][0]
    assert "wrote" not in outs[1][0]  # process 0 alone writes and reports
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(names) == 5
    for name in names:
        a = np.asarray(Image.open(tmp_path / "one" / name), np.int16)
        b = np.asarray(Image.open(tmp_path / "two" / name), np.int16)
        assert np.abs(a - b).max() <= 1, name  # float rounding at a .5 boundary at most
    table = lambda s: [line for line in s.splitlines() if " | " in line]  # noqa: E731
    assert table(one.stdout) == table(outs[0][0]) and len(table(one.stdout)) == 7
