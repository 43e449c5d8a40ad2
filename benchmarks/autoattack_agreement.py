"""srdjax's standard AutoAttack beside the same suite built from torchattacks, on one classifier.

    python benchmarks/autoattack_agreement.py                       # n = 1,000, L-inf 8/255
    python benchmarks/autoattack_agreement.py --n 100
    python benchmarks/autoattack_agreement.py --norm l2             # eps 0.5
    python benchmarks/autoattack_agreement.py --check-bridge        # the bridge's gradient only
    python benchmarks/autoattack_agreement.py --side torchattacks   # the reference side alone,
    python benchmarks/autoattack_agreement.py --reference FILE      # ... later compared with it

The peer is installed by hand, never by requirements.txt (torch's CPU wheel is about 190 MB;
from PyPI alone torch also pulls about 3 GB of CUDA libraries, which `--no-deps` leaves out:
the CUDA build then runs on the CPU once its few pure-Python dependencies are there):

    pip install torch --index-url https://download.pytorch.org/whl/cpu
    #   or, with PyPI only:  pip install --no-deps torch && pip install filelock sympy networkx jinja2 fsspec
    pip install --no-deps torchattacks==3.5.1      # its other dependencies (torchvision,
                                                   # requests, tqdm) are not used by these attacks

Both sides attack the same classifier (default: the quick config's PGD-AT model) on the same
class-balanced test images (the evaluation's: `class_balanced_subset(y, n / 10, seed 0)`), as a
cascade: clean-misclassified images are skipped, and each attack runs only on the images every
earlier attack failed to break, as fra31/auto-attack's `run_standard_evaluation` does. The torch
side runs the JAX classifier itself through `JaxLogits`, an autograd.Function whose forward is
the jitted JAX logits and whose backward is `jax.vjp` (float32, NCHW <-> NHWC), so both sides
see the same function and gradient.

The torchattacks attacks are configured to the official `version="standard"` settings
(fra31/auto-attack, autoattack.py: `set_version` and the constructors), not to the defaults of
torchattacks' own `AutoAttack` wrapper:
  APGD    loss "ce", 100 steps, 1 restart, rho 0.75           (torchattacks default: 10 steps)
  APGDT   100 steps, 1 restart, n_classes 10 -> targets ranked 2..10 on the clean logits
  FAB     multi_targeted, n_classes 10 -> 9 targets, 100 steps, 1 restart, alpha_max 0.1,
          eta 1.05, beta 0.9                                   (torchattacks default: 10 steps)
  Square  5,000 queries, p_init 0.8, 1 restart, margin loss, resc_schedule=False
Square's schedule: both codes halve p at it = 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000,
and with `resc_schedule` first map it -> int(it / n_queries * 10000). torchattacks' Square
defaults to resc_schedule=True, the official standard suite passes resc_schedule=False: with
5,000 queries the rescaled schedule would shrink the squares twice as fast (p_init/128 from
query 2,000 instead of 4,000). The official schedule is torchattacks' Square with
resc_schedule=False.

Prints and saves (benchmarks/results/autoattack_agreement[_l2][_n<N>].json): clean accuracy,
robust accuracy after each attack and in total for both, the images each side broke that the
other did not, wall times, and the bridge's gradient check.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORKDIR = Path("/work/runs_shared/runs/cifar10_quick")
SUITE = ("apgd-ce", "apgd-t", "fab-t", "square")
DEFAULT_EPS = {"linf": 8 / 255, "l2": 0.5}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=str(WORKDIR), help="a trained srdjax workdir")
    p.add_argument("--stage", default="pgd_at", help="its classifier stage")
    p.add_argument("--n", type=int, default=1000, help="class-balanced test images (n/10 a class)")
    p.add_argument("--norm", choices=("linf", "l2"), default="linf")
    p.add_argument("--eps", type=float, default=None, help="default 8/255 (linf), 0.5 (l2)")
    p.add_argument("--batch", type=int, default=250, help="images per attack call on both sides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-bridge", action="store_true", help="only compare the gradients")
    p.add_argument("--side", choices=("both", "torchattacks"), default="both",
                   help="torchattacks: run and save the reference side alone")
    p.add_argument("--reference", default=None,
                   help="a saved --side torchattacks result on the same settings, used instead "
                        "of running the reference again")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.n < 10 or args.n % 10:
        p.error(f"--n must be a positive multiple of 10 (class-balanced), got {args.n}")
    if args.eps is None:
        args.eps = DEFAULT_EPS[args.norm]
    return args


# ---------------------------------------------------------------------------------------------
# The classifier and the images, as srdjax's evaluation picks them.

def load_classifier(workdir, stage):
    """A jitted images [N, H, W, 3] in [0, 1] -> logits of the workdir's `stage` classifier."""
    import jax
    from srdjax import stages
    from srdjax.models import apply_model
    config = stages.load_config(workdir)
    config.workdir = str(workdir)
    graphdef, params, stats = stages.load_classifier(stages.Context(config), stage)
    return jax.jit(lambda x: apply_model(graphdef, params, stats, x)[0]), config


def load_images(config, n, seed):
    from srdjax.data import class_balanced_subset, load_dataset
    data_config = config.data.copy_and_resolve_references()
    data_config.test_per_class = 0
    test = load_dataset(data_config, "test", seed)
    index = class_balanced_subset(test.y, n // 10, seed)
    return (test.x[index].astype(np.float32) / 255.0, test.y[index].astype(np.int32),
            index)


# ---------------------------------------------------------------------------------------------
# The JAX <-> torch bridge.

def _bucket(n: int) -> int:
    """Batches are padded to a power of two (at least 8): the attacks call the model on ever
    changing subsets, and each new shape would cost a JAX compilation."""
    return max(8, 1 << (n - 1).bit_length())


def make_bridge(logits_fn):
    """(torch module NCHW -> logits, running on `logits_fn`; the autograd.Function)."""
    import jax
    import jax.numpy as jnp
    import torch

    value_and_vjp = jax.jit(lambda x: jax.vjp(logits_fn, x))
    pullback = jax.jit(lambda vjp_fn, g: vjp_fn(g)[0])

    def to_jax(x):
        n = x.shape[0]
        nhwc = x.detach().to(torch.float32).permute(0, 2, 3, 1).contiguous().cpu().numpy()
        padded = np.zeros((_bucket(n),) + nhwc.shape[1:], np.float32)
        padded[:n] = nhwc
        return jnp.asarray(padded), n

    class JaxLogits(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            xj, n = to_jax(x)
            if ctx.needs_input_grad[0]:
                logits, ctx.vjp_fn = value_and_vjp(xj)
            else:
                logits = logits_fn(xj)
            ctx.n = n
            return torch.from_numpy(np.array(logits[:n])).to(x.device)

        @staticmethod
        def backward(ctx, g):
            g_pad = np.zeros((_bucket(ctx.n), g.shape[1]), np.float32)
            g_pad[:ctx.n] = g.detach().cpu().numpy()
            grad = np.array(pullback(ctx.vjp_fn, jnp.asarray(g_pad))[:ctx.n])
            return torch.from_numpy(grad).permute(0, 3, 1, 2).contiguous().to(g.device)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # torchattacks finds the device from the model's first parameter.
            self.anchor = torch.nn.Parameter(torch.zeros(()), requires_grad=False)

        def forward(self, x):
            return JaxLogits.apply(x)

    return Model().eval(), JaxLogits


def check_bridge(logits_fn, x, y):
    """The input gradient of the mean cross-entropy through torch's autograd vs jax.grad."""
    import jax
    import jax.numpy as jnp
    import torch
    model, _ = make_bridge(logits_fn)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(xt), torch.from_numpy(y).long())
    loss.backward()
    loss = loss.detach()
    g_torch = xt.grad.numpy().transpose(0, 2, 3, 1)

    def jax_loss(xj):
        logp = jax.nn.log_softmax(logits_fn(xj))
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(y)[:, None], 1))
    value, g_jax = jax.value_and_grad(jax_loss)(jnp.asarray(x))
    g_jax = np.asarray(g_jax)
    return {"images": int(len(y)), "loss_torch": loss.item(), "loss_jax": float(value),
            "max_abs_grad_diff": float(np.abs(g_torch - g_jax).max()),
            "max_abs_grad": float(np.abs(g_jax).max()),
            "relative_diff": float(np.linalg.norm(g_torch - g_jax) / np.linalg.norm(g_jax))}


# ---------------------------------------------------------------------------------------------
# The two cascades. broken_by: index into SUITE of the attack that broke an image first, -1 if
# none did, -2 if it was misclassified clean (srdjax.attacks.autoattack's convention).

def torch_suite(model, norm, eps, seed):
    """The standard suite from torchattacks 3.5.1, set explicitly to the official settings."""
    import torchattacks
    tnorm = {"linf": "Linf", "l2": "L2"}[norm]
    return (
        torchattacks.APGD(model, norm=tnorm, eps=eps, steps=100, n_restarts=1, seed=seed,
                          loss="ce", eot_iter=1, rho=0.75),
        torchattacks.APGDT(model, norm=tnorm, eps=eps, steps=100, n_restarts=1, seed=seed,
                           eot_iter=1, rho=0.75, n_classes=10),
        torchattacks.FAB(model, norm=tnorm, eps=eps, steps=100, n_restarts=1, alpha_max=0.1,
                         eta=1.05, beta=0.9, seed=seed, multi_targeted=True, n_classes=10),
        torchattacks.Square(model, norm=tnorm, eps=eps, n_queries=5000, n_restarts=1,
                            p_init=0.8, loss="margin", resc_schedule=False, seed=seed),
    )


def _in_ball(x_adv, x, norm, eps):
    d = (x_adv - x).reshape(len(x), -1)
    size = np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)
    return (size <= eps * (1 + 1e-5) + 1e-6) & (x_adv.min((1, 2, 3)) >= 0) \
        & (x_adv.max((1, 2, 3)) <= 1)


def run_torch(logits_fn, x, y, *, norm, eps, batch, seed):
    import torch
    torch.set_num_threads(1)   # the work is in JAX; torch's own ops are small
    model, _ = make_bridge(logits_fn)
    attacks = torch_suite(model, norm, eps, seed)
    predict = lambda xs: np.concatenate([np.asarray(logits_fn(xs[i:i + batch])).argmax(1)
                                         for i in range(0, len(xs), batch)])
    broken_by = np.where(predict(x) == y, -1, -2)
    seconds = {}
    for a, (name, attack) in enumerate(zip(SUITE, attacks)):
        start = time.perf_counter()
        todo = np.flatnonzero(broken_by == -1)
        for i in range(0, len(todo), batch):
            idx = todo[i:i + batch]
            xt = torch.from_numpy(x[idx].transpose(0, 3, 1, 2).copy())
            adv = attack(xt, torch.from_numpy(y[idx]).long()).detach().numpy()
            adv = adv.transpose(0, 2, 3, 1)
            fooled = (predict(adv) != y[idx]) & _in_ball(adv, x[idx], norm, eps)
            broken_by[idx[fooled]] = a
        seconds[name] = time.perf_counter() - start
        print(f"  torchattacks {name:8s} robust {np.mean(broken_by == -1):.3f}  "
              f"({seconds[name]:.0f} s)", flush=True)
    return broken_by, seconds


def run_srdjax(logits_fn, x, y, *, norm, eps, batch, seed):
    import jax
    import jax.numpy as jnp
    from srdjax import attacks
    assert tuple(attacks.STANDARD_SUITE) == SUITE, attacks.STANDARD_SUITE
    key = jax.random.PRNGKey(seed)
    out = []
    start = time.perf_counter()
    for i in range(0, len(y), batch):
        ids = jnp.arange(i, min(i + batch, len(y)))
        _, b = attacks.autoattack(logits_fn, jnp.asarray(x[i:i + batch]),
                                  jnp.asarray(y[i:i + batch]), eps=eps, norm=norm,
                                  version="standard", key=key, ids=ids)
        out.append(np.asarray(b))
    broken_by = np.concatenate(out)
    return broken_by, {"total": time.perf_counter() - start}


def summary(broken_by):
    robust = {"clean": float(np.mean(broken_by != -2))}
    for a, name in enumerate(SUITE):
        robust[name] = float(np.mean((broken_by == -1) | (broken_by > a)))
    robust["total"] = float(np.mean(broken_by == -1))
    return robust


def compare(ours, ref, index):
    """Where the two cascades disagree on whether an image survives."""
    ours_robust, ref_robust = ours == -1, ref == -1
    only = lambda mask: [{"test_index": int(index[i]), "srdjax": int(ours[i]),
                          "torchattacks": int(ref[i])} for i in np.flatnonzero(mask)]
    return {"robust_only_srdjax": only(ours_robust & ~ref_robust),
            "robust_only_torchattacks": only(ref_robust & ~ours_robust),
            "clean_disagreements": int(np.sum((ours == -2) != (ref == -2)))}


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    from benchmarks.common import cpu_times, machine, write_json
    cpu_start = cpu_times()
    logits_fn, config = load_classifier(Path(args.workdir), args.stage)
    x, y, index = load_images(config, args.n, args.seed)
    bridge = check_bridge(logits_fn, x[:16], y[:16])
    print(f"bridge: max |grad diff| {bridge['max_abs_grad_diff']:.3g} "
          f"(max |grad| {bridge['max_abs_grad']:.3g}, relative {bridge['relative_diff']:.3g})")
    result = {"classifier": f"{args.workdir}:{args.stage}", "n": args.n, "norm": args.norm,
              "eps": args.eps, "seed": args.seed, "bridge": bridge}
    settings = dict(norm=args.norm, eps=args.eps, batch=args.batch, seed=args.seed)
    if not args.check_bridge:
        result.update({"test_index": index.tolist(), "suite": list(SUITE)})
        if args.side == "both":
            print("srdjax autoattack (standard) ...", flush=True)
            t0 = time.perf_counter()
            ours, ours_s = run_srdjax(logits_fn, x, y, **settings)
            ours_s["total"] = time.perf_counter() - t0
            result["srdjax"] = {"robust_accuracy": summary(ours), "seconds": ours_s,
                                "broken_by": ours.tolist()}
        if args.reference:
            result["torchattacks"] = load_reference(args.reference, result)
        else:
            result["torchattacks"] = reference_side(logits_fn, x, y, settings)
        if args.side == "both":
            report(result)
    result["machine"] = machine(since=cpu_start)
    if args.side == "torchattacks":
        name = "autoattack_torchattacks"
    else:
        name = "autoattack_bridge" if args.check_bridge else "autoattack_agreement"
    suffix = ("_l2" if args.norm == "l2" else "") + ("" if args.n == 1000 else f"_n{args.n}")
    write_json(args.out or REPO / "benchmarks/results" / f"{name}{suffix}.json", result)


def reference_side(logits_fn, x, y, settings):
    import torch
    import torchattacks
    print("torchattacks suite ...", flush=True)
    t0 = time.perf_counter()
    ref, ref_s = run_torch(logits_fn, x, y, **settings)
    ref_s["total"] = time.perf_counter() - t0
    return {"robust_accuracy": summary(ref), "seconds": ref_s, "broken_by": ref.tolist(),
            "version": torchattacks.__version__, "torch": torch.__version__,
            "ran_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def load_reference(path, result):
    """The torchattacks side of an earlier run, refused unless its settings and images match."""
    import json
    saved = json.loads(Path(path).read_text())
    for field in ("classifier", "n", "norm", "eps", "seed", "test_index", "suite"):
        if saved.get(field) != result[field]:
            raise SystemExit(f"--reference {path}: its {field} differs from this run's")
    return {**saved["torchattacks"], "from": str(path)}


def report(result):
    ours = np.asarray(result["srdjax"]["broken_by"])
    ref = np.asarray(result["torchattacks"]["broken_by"])
    result["disagreements"] = compare(ours, ref, np.asarray(result["test_index"]))
    a, b = result["srdjax"]["robust_accuracy"], result["torchattacks"]["robust_accuracy"]
    result["difference_points"] = {k: 100 * (a[k] - b[k]) for k in a}
    print(f"{'robust accuracy':16s} {'srdjax':>8s} {'torchatt':>9s} {'diff pts':>9s}")
    for k in a:
        print(f"{k:16s} {a[k]:8.3f} {b[k]:9.3f} {100 * (a[k] - b[k]):+9.1f}")
    d = result["disagreements"]
    print(f"robust only under srdjax: {len(d['robust_only_srdjax'])}, only under "
          f"torchattacks: {len(d['robust_only_torchattacks'])}; wall s: srdjax "
          f"{result['srdjax']['seconds']['total']:.0f}, torchattacks "
          f"{result['torchattacks']['seconds']['total']:.0f}")


if __name__ == "__main__":
    main()
