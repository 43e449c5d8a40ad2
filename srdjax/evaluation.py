"""Stage 6: every defense under every attack, per image, and the worst case over attacks.

    python evaluate.py --config configs/cifar10_quick.py

An image counts as robust to an attack only if the defense classifies it correctly both clean
and attacked; its worst case is robust only if it survives every attack that applies (the
per-image minimum). Gradient attacks always attack the *whole* defense: JPEG and bit depth
straight-through (BPDA), the blur exactly, purification with `purify_bpda`, plus the adaptive
attacks of `srdjax.adaptive` on the cluster choice. Results go to <workdir>/evaluation/:
results.json, results.md, robust_vs_eps.png and the per-image table per_image.npz.

A killed evaluation resumes: every finished (defense, attack, ε) cell is saved in
<workdir>/evaluation/cells/ and reused by the next run of the same command when nothing it
depends on has changed (see `CellCache`); `--config.evaluate.resume=False` recomputes them all.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from srdjax import adaptive, attacks, parallel, stages
from srdjax import purifier as purifier_lib
from srdjax.adaptive import Classifier, Defense, defense_logits, sharded_attack
from srdjax.checkpoints import atomic_write_json, atomic_write_text
from srdjax.checks import check
from srdjax.data import class_balanced_subset, load_dataset

# name -> (input transform, classifier stage). Purification also needs PURIFY_STAGES.
DEFENSES = {
    "none": ("none", "baseline"), "jpeg": ("jpeg", "baseline"),
    "bit_depth": ("bit_depth", "baseline"), "blur": ("blur", "baseline"),
    "pgd_at": ("none", "pgd_at"), "robust": ("none", "robust"),
    "srd_baseline": ("purify", "baseline"), "srd_robust": ("purify", "robust"),
}
PURIFY_STAGES = ("robust", "cluster", "dictionaries")
ATTACKS = ("fgsm", "pgd20", "pgd100", "apgd-ce", "apgd-dlr", "square", "transfer", "selector",
           "surrogate")
PURIFIER_ONLY = ("selector", "surrogate")   # they attack the cluster choice
CURVE_ATTACKS = ("fgsm", "pgd20", "pgd100", "apgd-ce", "apgd-dlr", "square")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The `evaluate` config section, checked (see configs/common.py for each field)."""
    defenses: tuple
    attacks: tuple
    norm: str
    eps: float
    eps_list: tuple
    curve_attack: str
    curve_per_class: int
    test_per_class: int
    batch_size: int
    seed: int
    jpeg_quality: int
    bit_depth: int
    blur_sigma: float
    pgd20_steps: int
    pgd100_steps: int
    pgd100_restarts: int
    apgd_steps: int
    square_queries: int
    transfer_steps: int
    selector_steps: int
    surrogate_steps: int
    surrogate_top: int
    surrogate_temperature: float
    eot_samples: int
    unbounded_max: float
    resume: bool

    @classmethod
    def from_config(cls, config) -> "Settings":
        section = config.get("evaluate")
        check(section is not None, "the config has no `evaluate` section (see configs/common.py)")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in section]
        check(not missing, f"config.evaluate lacks field(s) {missing} (see configs/common.py)")
        values = {f.name: section[f.name] for f in dataclasses.fields(cls)}
        for name in ("defenses", "attacks", "eps_list"):
            values[name] = tuple([values[name]] if isinstance(values[name], (str, float, int))
                                 else values[name])
        s = cls(**values)
        s.validate(tuple(config.data.image_size))
        return s

    def validate(self, image_size) -> None:
        for name in self.defenses:
            check(name in DEFENSES, f"unknown defense {name!r} in evaluate.defenses; known "
                                    f"defenses: {', '.join(DEFENSES)}")
        for name in self.attacks:
            check(name in ATTACKS, f"unknown attack {name!r} in evaluate.attacks; known "
                                   f"attacks: {', '.join(ATTACKS)}")
        check(self.defenses and self.attacks, "evaluate.defenses and evaluate.attacks must "
                                              "each name at least one")
        check(self.curve_attack in CURVE_ATTACKS, f"unknown evaluate.curve_attack "
              f"{self.curve_attack!r}; expected one of {', '.join(CURVE_ATTACKS)}")
        check(self.norm in ("linf", "l2"), f"evaluate.norm must be 'linf' or 'l2', got "
                                           f"{self.norm!r}")
        check(self.norm == "linf" or ("square" not in self.attacks
                                      and self.curve_attack != "square"),
              "the square attack is L∞ only; drop it from evaluate.attacks (and curve_attack) "
              "or use evaluate.norm='linf'")
        top = eps_limit(self.norm, image_size)
        unit = "L∞, pixel units: 8/255 = 0.0314" if self.norm == "linf" else "L2, pixel units"
        for name, value in [("eps", self.eps)] + [("eps_list", e) for e in self.eps_list]:
            check(isinstance(value, (int, float)) and 0.0 <= value <= top,
                  f"evaluate.{name} must lie in [0, {top:.4g}] ({unit}), got {value!r}")
        for name in ("batch_size", "pgd20_steps", "pgd100_steps", "pgd100_restarts",
                     "apgd_steps", "square_queries", "transfer_steps", "selector_steps",
                     "surrogate_steps", "surrogate_top", "eot_samples"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1,
                  f"evaluate.{name} must be an integer >= 1, got {value!r}")
        check(isinstance(self.resume, bool), f"evaluate.resume must be True or False, got "
                                             f"{self.resume!r}")
        check(self.test_per_class >= 0 and self.curve_per_class >= 0,
              "evaluate.test_per_class and curve_per_class must be >= 0 (0: all)")
        for name, ok, expected in (
                ("surrogate_temperature", self.surrogate_temperature > 0, "> 0"),
                ("blur_sigma", self.blur_sigma > 0, "> 0"),
                ("jpeg_quality", 1 <= self.jpeg_quality <= 100, "an integer in [1, 100]"),
                ("bit_depth", 1 <= self.bit_depth <= 16, "an integer in [1, 16]"),
                ("unbounded_max", 0 <= self.unbounded_max <= 1, "in [0, 1]")):
            check(ok, f"evaluate.{name} must be {expected}, got {getattr(self, name)!r}")

    def attack_settings(self, name: str) -> dict:
        """What the report states about how attack `name` was run."""
        return {"fgsm": {"steps": 1}, "pgd20": {"steps": self.pgd20_steps, "restarts": 1},
                "pgd100": {"steps": self.pgd100_steps, "restarts": self.pgd100_restarts},
                "apgd-ce": {"steps": self.apgd_steps}, "apgd-dlr": {"steps": self.apgd_steps},
                "square": {"queries": self.square_queries},
                "transfer": {"steps": self.transfer_steps, "source": "none (baseline)"},
                "selector": {"steps": self.selector_steps},
                "surrogate": {"steps": self.surrogate_steps, "top": self.surrogate_top,
                              "temperature": self.surrogate_temperature}}[name]


def eps_limit(norm: str, image_size) -> float:
    """The largest meaningful ε: any image of [0, 1]^d is within it of any other."""
    h, w = image_size
    return 1.0 if norm == "linf" else math.sqrt(h * w * 3)


# ------------------------------------------------------------------------------ defenses


_predict = jax.jit(lambda d, x: jnp.argmax(defense_logits(d, x), axis=-1))
_chosen_class = jax.jit(adaptive.chosen_class)
_selector_success = jax.jit(adaptive.selector_success)


def make_defense(name: str, classifier: Classifier, purifier=None, s: Settings | None = None):
    """Defense `name` of DEFENSES around `classifier`; `s` gives JPEG quality, bits, blur σ."""
    transform = DEFENSES[name][0]
    option = None if s is None else {"jpeg": s.jpeg_quality, "bit_depth": s.bit_depth,
                                     "blur": s.blur_sigma}.get(transform)
    return Defense(name, transform, option, classifier,
                   purifier if transform == "purify" else None)


def check_stages(ctx: stages.Context, s: Settings) -> None:
    """One error naming every missing stage and what needs it."""
    needed: dict[str, list[str]] = {}
    for name in s.defenses:
        transform, stage = DEFENSES[name]
        for st in (stage,) + (PURIFY_STAGES if transform == "purify" else ()):
            needed.setdefault(st, []).append(f"defense {name}")
    if "transfer" in s.attacks:
        needed.setdefault("baseline", []).append("the transfer attack")
    missing = [st for st in needed if not ctx.store(st).is_done()]
    check(not missing, f"{ctx.workdir} has no finished stage " + "; ".join(
        f"'{st}' (needed by {', '.join(needed[st])})" for st in missing)
        + ": run train.py with it in config.stages, or leave out what needs it")


def load_defenses(workdir, s: Settings, mesh=None):
    """(context, {name: Defense}, the undefended baseline) from a finished train.py workdir."""
    config = stages.load_config(workdir)
    config.workdir = str(workdir)
    ctx = stages.Context(config, mesh)
    check_stages(ctx, s)
    wanted = {DEFENSES[n][1] for n in s.defenses} | ({"baseline"} if "transfer" in s.attacks
                                                       else set())
    classifiers = {st: Classifier(*stages.load_classifier(ctx, st)) for st in sorted(wanted)}
    purifier = None
    if any(DEFENSES[n][0] == "purify" for n in s.defenses):
        purifier = parallel.replicate(ctx.mesh, purifier_lib.load_purifier(workdir, ctx.mesh))
    built = {n: make_defense(n, classifiers[DEFENSES[n][1]], purifier, s) for n in s.defenses}
    source = make_defense("none", classifiers["baseline"]) if "baseline" in classifiers else None
    return ctx, built, source


# ------------------------------------------------------------------------------ resuming

# The modules whose code decides an attack cell's result: a saved cell is reused only when they
# are byte for byte the ones that computed it.
RESULT_MODULES = ("adaptive", "attacks", "clusters", "defenses", "dictionary", "evaluation",
                  "frequency", "models", "omp", "parallel", "purifier")


@functools.lru_cache(maxsize=None)
def code_hash() -> str:
    h = hashlib.sha256(f"jax {jax.__version__}".encode())
    for name in RESULT_MODULES:
        h.update((Path(__file__).parent / f"{name}.py").read_bytes())
    return h.hexdigest()[:16]


def _array_hash(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


class CellCache:
    """Finished cells of an evaluation, one .npz per (defense, attack, ε) in `directory`, so a
    killed run resumes where it stopped. A cell's file name carries a hash of all its result
    depends on: the images and labels, ε, the attack's settings, seed and batch size, the
    defense and its options, the DONE.json of every stage it loads (a retrained stage has a new
    one), and the code (`RESULT_MODULES`, the JAX version). Change any and the cell runs again.
    Process 0 reads and writes; in a multi-process run it hands what it read to the others.
    `read=False` recomputes every cell (and overwrites the saved ones)."""

    def __init__(self, directory: Path, stage_stamps: dict, *, read: bool = True):
        self.dir, self.stage_stamps, self.read = Path(directory), stage_stamps, read
        self.reused, self.computed = 0, 0

    def key(self, what: str, stages_used, **parts) -> str:
        parts = {"what": what, "code": code_hash(),
                 "stages": {st: self.stage_stamps[st] for st in sorted(set(stages_used))},
                 **parts}
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
        return f"{what}.{digest.hexdigest()[:20]}"

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.npz"

    def load(self, key: str, n: int):
        """(per-image bool [n], seconds) of a saved cell, or None."""
        found, values, seconds = False, np.zeros(n, bool), 0.0
        if self.read and parallel.is_main_process() and self._path(key).exists():
            try:
                with np.load(self._path(key), allow_pickle=False) as f:
                    values, seconds = f["values"], float(f["seconds"])
                found = values.shape == (n,) and values.dtype == bool
            except (OSError, ValueError, KeyError) as e:
                tqdm.write(f"ignoring unreadable saved cell {self._path(key)} ({e})")
            if not found:
                values = np.zeros(n, bool)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            found, values, seconds = multihost_utils.broadcast_one_to_all(
                (np.asarray(found), values, np.asarray(seconds, np.float64)))
            found, values, seconds = bool(found), np.asarray(values), float(seconds)
        if not found:
            return None
        self.reused += 1
        return values, seconds

    def save(self, key: str, values: np.ndarray, seconds: float, description: str) -> None:
        self.computed += 1
        if not parallel.is_main_process():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f"{key}.tmp{os.getpid()}.npz"
        np.savez(tmp, values=np.asarray(values, bool), seconds=np.float64(seconds),
                 description=np.str_(description))
        os.replace(tmp, self._path(key))


def _stage_stamps(ctx: stages.Context, names) -> dict:
    """Each finished stage's DONE.json, hashed (it changes whenever the stage is re-run)."""
    return {st: hashlib.sha256(ctx.store(st).done_path.read_bytes()).hexdigest()[:16]
            for st in names if ctx.store(st).is_done()}


def _defense_stages(d: "Defense") -> tuple:
    stage = DEFENSES[d.name][1] if d.name in DEFENSES else "baseline"
    return (stage,) + (PURIFY_STAGES if d.transform == "purify" else ())


# ------------------------------------------------------------------------------ attacks


def applies(attack: str, d: Defense) -> bool:
    return attack not in PURIFIER_ONLY or d.transform == "purify"


def _batches(n: int, batch_size: int, mesh):
    """Fixed-size batches (the last padded by repeating its last row): one compile per attack."""
    size = batch_size + -batch_size % mesh.size
    return size, [(i, min(i + size, n)) for i in range(0, n, size)]


def _batch(mesh, x, y, start, stop, size):
    idx = np.minimum(np.arange(start, start + size), stop - 1)
    return parallel.shard_global(mesh, x[idx], y[idx])


def _key(seed: int, attack: str, eps: float, batch: int):
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(attack.encode()) & 0x7FFFFFFF)
    return jax.random.fold_in(jax.random.fold_in(key, int(round(eps * 2 ** 20))), batch)


def _map_batches(fn, x, y, s: Settings, mesh, *extra) -> np.ndarray:
    """fn(x_batch, y_batch, *extra_batch) over fixed-size batches, concatenated on the host;
    `extra` are per-batch device arrays already made (e.g. a batch's adversarial images)."""
    size, batches = _batches(len(y), s.batch_size, mesh)
    return np.concatenate([
        parallel.to_host(fn(*_batch(mesh, x, y, a, b, size), *[e[i] for e in extra]))[:b - a]
        for i, (a, b) in enumerate(batches)])


def predict_correct(d: Defense, x, y, s: Settings, mesh) -> np.ndarray:
    return _map_batches(lambda xb, yb: _predict(d, xb), x, y, s, mesh) == y


def _attack_program(attack: str, s: Settings, mesh):
    """Host loops on a CPU (or when attacks.LOOPS says so), else one sharded program."""
    if attacks._use_host_loops():
        return adaptive.host_attack(attack, s, mesh)
    return sharded_attack(attack, s, mesh)


def attack_matrix(built: dict, attack_names, x, y, *, eps: float, s: Settings, mesh,
                  source: Defense | None = None, desc: str = "attacks",
                  cache: CellCache | None = None) -> dict:
    """At one ε: per (defense, attack) that applies, whether each image is still classified
    correctly after the attack [n] bool, and the seconds it took. Transfer and selector images
    do not depend on the defense scored, so they are made once per batch and reused. Cells
    saved in `cache` are read instead of run, and cells run are saved there."""
    size, batches = _batches(len(y), s.batch_size, mesh)
    cells = [(a, n) for a in attack_names for n, d in built.items() if applies(a, d)]
    correct, seconds, shared = {n: {} for n in built}, {n: {} for n in built}, {}
    data = None if cache is None else _array_hash(x, y)

    def cell_key(what, stages_used, **parts):
        return cache.key(what, stages_used, images=data, eps=float(eps), norm=s.norm,
                         seed=s.seed, batch_size=s.batch_size, **parts)

    def adversarial(attack, d, b, xb, yb):
        if attack in ("transfer", "selector"):
            if (attack, b) not in shared:
                target = source if attack == "transfer" else d
                shared[attack, b] = _attack_program(attack, s, mesh)(
                    target, xb, yb, _key(s.seed, attack, eps, b), eps)
            return shared[attack, b]
        return _attack_program(attack, s, mesh)(d, xb, yb, _key(s.seed, attack, eps, b), eps)

    bar = tqdm(total=len(cells) * len(batches), desc=desc, unit="batch", dynamic_ncols=True,
               disable=not parallel.is_main_process())
    for attack, name in cells:
        d = built[name]
        key = None
        if cache is not None:
            used = _defense_stages(d) + (("baseline",) if attack == "transfer" else ())
            key = cell_key(f"{name}.{attack}", used, defense=[d.name, d.transform, d.option],
                           attack=attack, settings=s.attack_settings(attack),
                           eot_samples=s.eot_samples)
            saved = cache.load(key, len(y))
            if saved is not None:
                correct[name][attack], seconds[name][attack] = saved
                bar.update(len(batches))
                continue
        bar.set_postfix_str(f"{name} × {attack}")
        start_time, parts = time.time(), []
        for b, (lo, hi) in enumerate(batches):
            xb, yb = _batch(mesh, x, y, lo, hi, size)
            parts.append(parallel.to_host(_predict(d, adversarial(attack, d, b, xb, yb)))[:hi - lo])
            bar.update(1)
        correct[name][attack] = np.concatenate(parts) == y
        seconds[name][attack] = time.time() - start_time
        if cache is not None:
            cache.save(key, correct[name][attack], seconds[name][attack],
                       f"{name} under {attack} at eps {eps:.6g}, {len(y)} images")
    bar.close()
    selector_wrong = None
    purified = [d for d in built.values() if d.transform == "purify"]
    if "selector" in attack_names and purified:
        d = purified[0]
        key = None if cache is None else cell_key(
            "selector_success", PURIFY_STAGES, settings=s.attack_settings("selector"))
        saved = None if cache is None else cache.load(key, len(y))
        if saved is not None:
            selector_wrong = saved[0]
        else:
            selector_wrong = _map_batches(
                lambda xb, yb, b: _selector_success(
                    d.purifier, adversarial("selector", d, b, xb, yb), yb),
                x, y, s, mesh, range(len(batches)))
            if cache is not None:
                cache.save(key, selector_wrong, 0.0, f"selector success at eps {eps:.6g}")
    return {"correct": correct, "seconds": seconds, "selector_wrong": selector_wrong}


def worst_case(clean: np.ndarray, under_attack: dict) -> np.ndarray:
    """Per image: correct clean and under every attack (the minimum over attacks)."""
    return np.min(np.stack([clean] + list(under_attack.values())), axis=0)


# ------------------------------------------------------------------------------ the run


def evaluate(config, mesh=None) -> dict:
    """Run the whole evaluation of `config.workdir`; write the reports and return the results."""
    s = Settings.from_config(config)
    out = str(config.evaluate.get("output", "") or "evaluation")
    check("/" not in out and out not in (".", ".."),
          f"evaluate.output must be a folder name inside the workdir, got {out!r}")
    t0 = time.time()
    ctx, built, source = load_defenses(Path(config.workdir).expanduser(), s, mesh)
    data_config = config.data.copy_and_resolve_references()
    data_config.test_per_class = 0
    test = load_dataset(data_config, "test", s.seed)
    index = (np.arange(len(test)) if not s.test_per_class
             else class_balanced_subset(test.y, s.test_per_class, s.seed))
    x, y = test.x[index].astype(np.float32) / 255.0, test.y[index].astype(np.int32)
    # One batch shape for the whole run (no larger than the images need): compile once.
    s = dataclasses.replace(s, batch_size=min(s.batch_size, len(y)))
    clean = {n: predict_correct(d, x, y, s, ctx.mesh) for n, d in built.items()}
    cache = CellCache(ctx.workdir / out / "cells", _stage_stamps(ctx, set(
        st for d in built.values() for st in _defense_stages(d)) | {"baseline"}), read=s.resume)
    main = attack_matrix(built, s.attacks, x, y, eps=s.eps, s=s, mesh=ctx.mesh, source=source,
                         cache=cache)

    # The ε curve and the sanity checks run on a class-balanced part of the evaluated images.
    sub = (np.arange(len(y)) if not s.curve_per_class
           else class_balanced_subset(y, s.curve_per_class, s.seed))
    curve = {}
    for eps in sorted(set(map(float, s.eps_list)) | {0.0}):
        if math.isclose(eps, s.eps) and s.curve_attack in s.attacks:
            curve[eps] = {n: main["correct"][n][s.curve_attack][sub] for n in built}
            continue
        run = attack_matrix(built, (s.curve_attack,), x[sub], y[sub], eps=eps, s=s,
                            mesh=ctx.mesh, desc=f"{s.curve_attack} at eps {eps:.4g}",
                            cache=cache)
        curve[eps] = {n: run["correct"][n][s.curve_attack] for n in built}
    unbounded_eps = eps_limit(s.norm, x.shape[1:3])
    unbounded = attack_matrix(built, (s.curve_attack,), x[sub], y[sub], eps=unbounded_eps, s=s,
                              mesh=ctx.mesh, desc="unbounded sanity check", cache=cache)
    purifiers = [d.purifier for d in built.values() if d.transform == "purify"]
    true_cluster = None if not purifiers else _map_batches(
        lambda xb, _: _chosen_class(purifiers[0], xb), x, y, s, ctx.mesh) == y

    result = summarize(s, clean, main, curve, clean_sub={n: v[sub] for n, v in clean.items()},
                       unbounded={n: clean[n][sub] & unbounded["correct"][n][s.curve_attack]
                                  for n in built},
                       unbounded_eps=unbounded_eps, true_cluster=true_cluster,
                       workdir=str(ctx.workdir), run_time=time.time() - t0)
    result["output"] = str(ctx.workdir / out)
    # Cells read from an earlier, killed run keep the seconds they took then.
    result["cells"] = {"run": cache.computed, "resumed": cache.reused,
                       "attack_seconds": round(sum(v or 0.0 for per in main["seconds"].values()
                                                   for v in per.values()), 1)}
    write_reports(ctx.workdir / out, result, per_image={
        "test_index": index, "y": y, **{f"{n}/clean": clean[n] for n in built},
        **{f"{n}/{a}": v for n in built for a, v in main["correct"][n].items()},
        **{f"{n}/worst_case": worst_case(clean[n], main["correct"][n]) for n in built}})
    return result


def _machine() -> dict:
    import platform
    devices = jax.devices()
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "devices": f"{len(devices)} x {devices[0].device_kind}"}


def summarize(s: Settings, clean, main, curve, *, clean_sub, unbounded, unbounded_eps,
              true_cluster, workdir, run_time) -> dict:
    """Accuracies, worst case, curve, sanity checks and verdict as one JSON-able dict."""
    import datetime
    acc = lambda v: float(np.mean(v))  # noqa: E731
    names = list(clean)
    robust = {n: {a: (acc(clean[n] & main["correct"][n][a]) if a in main["correct"][n] else None)
                  for a in s.attacks} for n in names}
    per_image = {n: worst_case(clean[n], main["correct"][n]) for n in names}
    worst = {n: acc(per_image[n]) for n in names}
    eps_values = sorted(curve)
    curve_acc = {n: [acc(clean_sub[n] & curve[e][n]) for e in eps_values] for n in names}
    mismatches = {n: int(np.sum(curve[0.0][n] != clean_sub[n])) for n in names}
    rises = [{"defense": n, "from_eps": eps_values[i], "to_eps": eps_values[i + 1],
              "from": curve_acc[n][i], "to": curve_acc[n][i + 1]}
             for n in names for i in range(len(eps_values) - 1)
             if curve_acc[n][i + 1] > curve_acc[n][i]]
    unbounded_acc = {n: acc(v) for n, v in unbounded.items()}
    flagged = [n for n, v in unbounded_acc.items() if v > s.unbounded_max]
    wrong = main["selector_wrong"]
    selector = None if wrong is None else {
        "success_rate": acc(wrong),
        "clean_true_cluster_rate": None if true_cluster is None else acc(true_cluster),
        "switched_from_true_cluster": acc(wrong[true_cluster]) if true_cluster.any() else None}
    sanity = {
        "eps0_equals_clean": {"passed": not any(mismatches.values()), "mismatches": mismatches},
        "monotone_in_eps": {"passed": not rises, "rises": rises},
        "unbounded": {"eps": unbounded_eps, "attack": s.curve_attack, "robust": unbounded_acc,
                      "max_allowed": s.unbounded_max, "flagged": flagged, "passed": not flagged},
        "selector_success_rate": None if selector is None else selector["success_rate"]}
    sanity["passed"] = all(sanity[k]["passed"] for k in
                           ("eps0_equals_clean", "monotone_in_eps", "unbounded"))
    seconds = {n: {a: main["seconds"][n].get(a) for a in s.attacks} for n in names}
    verdict, versus = _verdict(names, worst, per_image)
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": _machine(), "run_time_s": round(run_time, 1), "workdir": workdir,
        "n": int(len(next(iter(clean.values())))), "test_per_class": s.test_per_class,
        "seed": s.seed, "batch_size": s.batch_size, "norm": s.norm, "eps": s.eps,
        "defenses": names,
        "attacks": list(s.attacks),
        "attack_settings": {a: s.attack_settings(a) for a in s.attacks},
        "clean": {n: acc(clean[n]) for n in names}, "robust": robust, "worst_case": worst,
        "worst_case_over": {n: [a for a in s.attacks if a in main["correct"][n]]
                            for n in names},
        "seconds": seconds,
        "seconds_per_attack": {a: sum(v[a] or 0.0 for v in seconds.values()) for a in s.attacks},
        "selector": selector,
        "curve": {"attack": s.curve_attack, "n": int(len(next(iter(clean_sub.values())))),
                  "eps": eps_values, "robust": curve_acc},
        "sanity": sanity,
        "eot": ("Every defense evaluated here is deterministic (purification, JPEG, bit depth and "
                "blur draw no random numbers), so EOT reduces to the plain attack; "
                f"eot_samples = {s.eot_samples} applies only to defenses flagged random."),
        "verdict": verdict, "versus_pgd_at": versus}


def paired_difference(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """Accuracy difference of two defenses scored on the same images (per-image booleans), with
    a normal-approximation 95% interval for it: the mean and standard error of the per-image
    differences (+1, 0, -1), which pairs the images instead of treating the two as independent
    samples. Also how many images only one of them keeps."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    check(ours.dtype == bool and theirs.dtype == bool and ours.ndim == 1
          and ours.shape == theirs.shape and ours.size > 0,
          f"paired_difference needs two non-empty 1-d boolean arrays of the same length, got "
          f"{ours.dtype} {ours.shape} and {theirs.dtype} {theirs.shape}")
    diff = ours.astype(np.float64) - theirs.astype(np.float64)
    n = diff.size
    mean = float(np.mean(diff))
    half = 1.96 * float(np.std(diff)) / np.sqrt(n)
    return {"difference": mean, "low": mean - half, "high": mean + half, "n": int(n),
            "only_ours": int(np.sum(ours & ~theirs)), "only_theirs": int(np.sum(~ours & theirs))}


def _verdict(names, worst, per_image) -> tuple[str | None, dict | None]:
    """The sentence the reports lead with, and the paired comparison behind it: srdjax's best
    defense against PGD-AT under the worst case. "Beats" only when the 95% interval of the
    paired difference lies above zero."""
    srd = [n for n in names if n.startswith("srd_")]
    if not srd:
        return None, None
    best = max(srd, key=lambda n: worst[n])
    if "pgd_at" not in names:
        return "PGD-AT was not among this run's defenses, so srdjax is not compared with it.", None
    c = paired_difference(per_image[best], per_image["pgd_at"])
    ours, theirs = 100 * worst[best], 100 * worst["pgd_at"]
    detail = (f"difference {100 * c['difference']:+.1f} points, 95% interval "
              f"{100 * c['low']:+.1f} to {100 * c['high']:+.1f} on the same {c['n']} images; "
              f"{c['only_ours']} kept only by {best}, {c['only_theirs']} only by PGD-AT")
    if c["low"] > 0:
        text = (f"srdjax ({best}) beats PGD-AT under the worst case over these attacks: "
                f"{ours:.1f}% vs {theirs:.1f}% ({detail}).")
    else:  # the interval reaches zero; ahead all the same: "not beyond chance"
        chance = " beyond chance" if c["difference"] > 0 else ""
        text = (f"srdjax does not beat PGD-AT{chance} under the worst case: its best defense "
                f"({best}) keeps {ours:.1f}% of the images against every attack, PGD-AT "
                f"{theirs:.1f}% ({detail}).")
    return text, {"defense": best, **c}


# ------------------------------------------------------------------------------ reports


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _eps_text(eps: float, norm: str) -> str:
    if eps == 0:
        return "0"
    return f"{eps * 255:.4g}/255" if norm == "linf" else f"{eps:.4g}"


def _table(header, rows) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (
        len(header) - 1)) + "|"] + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


# What `attack_matrix` writes into a saved cell: "<defense> under <attack> at eps <ε>, <n> images".
_CELL_TEXT = re.compile(r"(?P<defense>\S+) under (?P<attack>\S+) at eps (?P<eps>\S+), "
                        r"(?P<n>\d+) images")


def saved_cells(directory) -> tuple[list[dict], int]:
    """The attack cells saved in an evaluation's `cells/` folder, read from their own descriptions
    (dicts of defense, attack, eps, n, correct per image after the attack, seconds, file), and
    how many older files of the same cells were passed over.

    It reads files only: no model, and whatever code or data made them (a cell's file name is a
    hash of those, which only the run that made it can match). Of files with the same defense,
    attack, ε and n, the newest is kept. Selector-success cells and unreadable files are left
    out."""
    found, older = {}, 0
    for path in sorted(Path(directory).glob("*.npz"), key=lambda q: (q.stat().st_mtime, q.name)):
        try:
            with np.load(path, allow_pickle=False) as f:
                text, correct, seconds = str(f["description"]), f["values"], float(f["seconds"])
        except (OSError, ValueError, KeyError):
            continue
        m = _CELL_TEXT.fullmatch(text)
        if m is None or correct.dtype != bool or correct.shape != (int(m["n"]),):
            continue
        cell = dict(defense=m["defense"], attack=m["attack"], eps=float(m["eps"]), n=int(m["n"]),
                    correct=correct, seconds=seconds, file=path.name)
        what = (cell["defense"], cell["attack"], cell["eps"], cell["n"])
        older += what in found
        found[what] = cell
    return list(found.values()), older


def saved_cells_markdown(directory, eps: float | None = None, norm: str = "linf") -> str:
    """A progress table of an unfinished evaluation from its saved cells at one ε (default: the ε
    of most cells): % of images classified correctly after each attack, and the lowest per-image
    result over the attacks saved so far. Both are upper bounds on the finished report's figures,
    which also require a correct clean prediction and take the worst case over every attack."""
    cells, older = saved_cells(directory)
    check(bool(cells), f"no saved evaluation cells in {directory}")
    if eps is None:
        counts = {}
        for c in cells:
            counts[c["eps"]] = counts.get(c["eps"], 0) + 1
        eps = max(counts, key=lambda e: (counts[e], e))
    cells = [c for c in cells if math.isclose(c["eps"], eps, rel_tol=1e-5)]
    check(bool(cells), f"no saved cells at eps {eps:.6g} in {directory}")
    defenses = list(dict.fromkeys(c["defense"] for c in cells))
    attacks = list(dict.fromkeys(c["attack"] for c in cells))
    table = {(c["defense"], c["attack"]): c for c in cells}
    rows = []
    for d in defenses:
        mine = [table[d, a] for a in attacks if (d, a) in table]
        same_n = len({c["n"] for c in mine}) == 1
        low = np.min(np.stack([c["correct"] for c in mine]), 0).mean() if same_n else None
        rows.append([d] + [_pct(table[d, a]["correct"].mean()) if (d, a) in table else "–"
                           for a in attacks] + [_pct(low), len(mine)])
    ns = sorted({c["n"] for c in cells})
    lines = [f"Saved cells in {directory} at ε = {_eps_text(eps, norm)}, "
             f"n = {', '.join(map(str, ns))} images: % correct after each attack; – : not saved "
             "(yet). Upper bounds on the finished report (which also requires a correct clean "
             "prediction and takes every attack).", ""]
    lines += _table(["defense"] + attacks + ["lowest so far", "cells"], rows)
    if older:
        lines += ["", f"{older} older file(s) of the same cells passed over."]
    return "\n".join(lines)


def _resumed_text(r: dict) -> str:
    cells = r.get("cells") or {}
    if not cells.get("resumed"):
        return ""
    return (f" ({cells['resumed']} of {cells['resumed'] + cells['run']} attack cells resumed "
            f"from an earlier, stopped run; the main table's attacks took "
            f"{cells['attack_seconds']:.0f} s in all)")


def render_markdown(r: dict) -> str:
    """The report: the main table (defenses × attacks + worst case, accuracy in %) first."""
    m, norm = r["machine"], r["norm"]
    per = f"{r['test_per_class']} per class" if r["test_per_class"] else "the whole test set"
    lines = [f"# srdjax evaluation of {r['workdir']}", "",
             f"{r['date']}; {m['platform']}, {m['cpu_count']} CPUs, jax {m['jax']} on "
             f"{m['devices']}; run time {r['run_time_s']:.0f} s{_resumed_text(r)}.", "",
             f"Test images: n = {r['n']} ({per}, seed {r['seed']}). Threat model: "
             f"{'L∞' if norm == 'linf' else 'L2'}, ε = {_eps_text(r['eps'], norm)}. Accuracy "
             "in %: an image counts under an attack if it is classified correctly both clean "
             "and attacked; worst case: under every attack of its row. – : does not apply "
             "(selector and surrogate attack the purifier's cluster choice).", ""]
    lines += _table(["defense", "clean"] + r["attacks"] + ["worst case"], [
        [n, _pct(r["clean"][n])] + [_pct(r["robust"][n][a]) for a in r["attacks"]]
        + [_pct(r["worst_case"][n])] for n in r["defenses"]])
    if r["verdict"]:
        lines += ["", f"**{r['verdict']}**"]
    lines += ["", "Attacks: " + "; ".join(
        f"{a} ({', '.join(f'{k} {v}' for k, v in r['attack_settings'][a].items())})"
        for a in r["attacks"]) + ". Gradients: BPDA straight-through for JPEG and bit depth, "
        "exact for the blur, purify_bpda (exact given the cluster and OMP supports) for "
        "purification. " + r["eot"]]
    c, san = r["curve"], r["sanity"]
    e0, mono, unb = san["eps0_equals_clean"], san["monotone_in_eps"], san["unbounded"]
    ok = lambda passed: "passed" if passed else "**FAILED**"  # noqa: E731
    lines += ["", "## Sanity checks", "",
              f"- ε = 0 gives clean accuracy, per image ({c['attack']}, n = {c['n']}): "
              f"{ok(e0['passed'])}; images that differ: "
              + ", ".join(f"{n} {v}" for n, v in e0["mismatches"].items()) + ".",
              f"- accuracy does not rise with ε ({c['attack']}): {ok(mono['passed'])}"
              + "".join(f"; {x['defense']} rises from {_pct(x['from'])}% at "
                        f"{_eps_text(x['from_eps'], norm)} to {_pct(x['to'])}% at "
                        f"{_eps_text(x['to_eps'], norm)}" for x in mono["rises"]) + ".",
              f"- an unbounded attack ({unb['attack']}, ε = {unb['eps']:.4g}) drives every "
              f"defense near 0 (at most {_pct(unb['max_allowed'])}%): {ok(unb['passed'])}; "
              + ", ".join(f"{n} {_pct(v)}%" for n, v in unb["robust"].items())
              + ("" if not unb["flagged"] else f"; flagged: {', '.join(unb['flagged'])}") + "."]
    sel = r["selector"]
    lines.append("- selector attack: " + ("not run." if sel is None else
                 f"purify chooses a wrong class's cluster for {_pct(sel['success_rate'])}% of "
                 f"the attacked images (clean: the true class's cluster for "
                 f"{_pct(sel['clean_true_cluster_rate'])}%; of those, "
                 f"{_pct(sel['switched_from_true_cluster'])}% switched)."))
    lines += ["", f"## Accuracy (%) against ε ({c['attack']}, n = {c['n']})", ""]
    lines += _table(["defense"] + [_eps_text(e, norm) for e in c["eps"]],
                    [[n] + [_pct(v) for v in c["robust"][n]] for n in r["defenses"]])
    lines += ["", "## Seconds per attack (compilation included; transfer and selector images "
              "are made once and charged to the first defense scored)", ""]
    lines += _table(["defense"] + r["attacks"], [
        [n] + ["–" if r["seconds"][n][a] is None else f"{r['seconds'][n][a]:.1f}"
               for a in r["attacks"]] for n in r["defenses"]])
    return "\n".join(lines) + "\n"


def parse_markdown_table(text: str) -> dict:
    """{defense: {column: percent or None}} from the report's first table."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    header = [h.strip() for h in rows[0].strip("|").split("|")]
    out = {}
    for line in rows[2:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(header):
            break
        out[cells[0]] = {h: (None if v == "–" else float(v)) for h, v in zip(header[1:],
                                                                              cells[1:])}
    return out


def plot_curve(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    c, scale = r["curve"], (255.0 if r["norm"] == "linf" else 1.0)
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in r["defenses"]:
        line, = ax.plot(np.asarray(c["eps"]) * scale, 100 * np.asarray(c["robust"][n]),
                        marker="o", label=n)
        ax.plot([r["eps"] * scale], [100 * r["worst_case"][n]], marker="x", markersize=9,
                color=line.get_color(), linestyle="none")
    ax.set_xlabel("ε (/255)" if r["norm"] == "linf" else "ε (L2)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{c['attack']} accuracy against ε (n = {c['n']}); x: worst case")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_reports(out_dir: Path, r: dict, per_image: dict) -> None:
    """results.json, results.md, robust_vs_eps.png, per_image.npz; each written to a temporary
    name and renamed, so a killed run leaves no half-written file."""
    if not parallel.is_main_process():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "results.json", r)
    atomic_write_text(out_dir / "results.md", render_markdown(r))
    plot_curve(r, out_dir / "robust_vs_eps.png")
    tmp = out_dir / "per_image.npz.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **per_image)
    tmp.replace(out_dir / "per_image.npz")
