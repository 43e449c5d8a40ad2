"""Stage 6: every defense under every attack, per image, and the worst case over attacks.

    python evaluate.py --config configs/cifar10_quick.py

An image counts as robust to an attack only if the defense classifies it correctly both clean
and attacked; its worst case is robust only if it survives every attack that applies (the
per-image minimum). Gradient attacks always attack the *whole* defense: JPEG and bit depth
straight-through (BPDA), the blur exactly, purification with `purify_bpda`, plus the adaptive
attacks of `srdjax.attacks.whole_defense` on the cluster choice. Results go to
<workdir>/evaluation/:
results.json, results.md, robust_vs_eps.png and the per-image table per_image.npz, written by
`srdjax.report` (which is not among the `RESULT_MODULES`: rewording a report keeps the cells).

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
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from srdjax import attacks, parallel, stages
from srdjax.attacks import whole_defense
from srdjax import purifier as purifier_lib
from srdjax.attacks.whole_defense import Classifier, Defense, defense_logits, sharded_attack
from srdjax.checks import check
from srdjax.data import class_balanced_subset, load_dataset
from srdjax.report import summarize, worst_case, write_reports

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
_chosen_class = jax.jit(whole_defense.chosen_class)
_selector_success = jax.jit(whole_defense.selector_success)


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

# The modules (or packages: every file in them) whose code decides an attack cell's result: a
# saved cell is reused only when they are byte for byte the ones that computed it.
RESULT_MODULES = ("attacks", "clusters", "defenses", "dictionary", "evaluation",
                  "frequency", "models", "omp", "parallel", "purifier")


@functools.lru_cache(maxsize=None)
def code_hash() -> str:
    h = hashlib.sha256(f"jax {jax.__version__}".encode())
    for name in RESULT_MODULES:
        package = Path(__file__).parent / name
        paths = sorted(package.glob("*.py")) if package.is_dir() else [package.with_suffix(".py")]
        for path in paths:
            h.update(path.read_bytes())
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
    if attacks.loops._use_host_loops():
        return whole_defense.host_attack(attack, s, mesh)
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
            # report.saved_cells reads this description back: keep the two formats the same
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
