"""Stage 6: every defense under a cascade of attacks, per image, and the worst case.

    python evaluate.py --config configs/cifar10_quick.py

For each defense the attacks of `config.evaluate.attacks` run in that order, each only on the
images still classified correctly after every earlier one (`srdjax.cascade`); an image counts as
robust only if it is classified correctly clean and survives them all. Gradient attacks always
attack the *whole* defense: JPEG and bit depth straight-through (BPDA), the blur exactly,
purification with `purify_bpda`; transfer attacks start from the bare baseline, robust and
PGD-AT classifiers; the selector and surrogate attacks aim at the purifier's cluster choice.
The defense named by `config.evaluate.compare` is compared with PGD-AT on the same images by
the exact McNemar test. Results go to <workdir>/<evaluate.output>/: results.json, results.md,
robust_vs_eps.png and per_image.npz (per defense, which attack broke each image), written by
`srdjax.report`. Every finished cell is saved in <output>/cells/ as it ends and reused when
nothing it depends on has changed, so a killed run resumes with the same result;
`--config.evaluate.resume=False` recomputes them all.

`evaluate.purify` sets how every purification defense purifies at test time (the cluster
choice, Tikhonov λ and OMP sparsity, `srdjax.purify_variants`; the trained stages stay as they
are), and `evaluate.subset` whether the images are the report subset or a disjoint screening
subset (`evaluated_subset`): the purifier ablation (benchmarks/ablation.py) screens variants on
one and reports the chosen on the other.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import time
from pathlib import Path

import jax
import numpy as np

from srdjax import attacks, cascade, parallel, purify_variants, report, stages
from srdjax.attacks.whole_defense import Classifier, Defense
from srdjax.cascade import PURIFIER_ONLY, TRANSFER_SOURCES
from srdjax.checks import check
from srdjax.data import class_balanced_subset, load_dataset

# name -> (input transform, classifier stage). Purification also needs PURIFY_STAGES.
DEFENSES = {
    "none": ("none", "baseline"), "jpeg": ("jpeg", "baseline"),
    "bit_depth": ("bit_depth", "baseline"), "blur": ("blur", "baseline"),
    "pgd_at": ("none", "pgd_at"), "robust": ("none", "robust"),
    "srd_baseline": ("purify", "baseline"), "srd_robust": ("purify", "robust"),
    "srd_purified_at": ("purify", "purified_at"),
}
PURIFY_STAGES = ("robust", "cluster", "dictionaries")
ATTACKS = cascade.REGISTRY + tuple(TRANSFER_SOURCES) + PURIFIER_ONLY
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
    n_target_classes: int
    fab_steps: int
    square_queries: int
    transfer_steps: int
    selector_steps: int
    surrogate_steps: int
    surrogate_top: int
    surrogate_temperature: float
    eot_samples: int
    unbounded_max: float
    compare: str
    resume: bool
    # Optional in a config (older workdirs' saved configs lack them): these defaults.
    purify: purify_variants.Variant = purify_variants.NEAREST
    subset: str = "report"
    report_per_class: int = 0

    @classmethod
    def from_config(cls, config) -> "Settings":
        section = config.get("evaluate")
        check(section is not None, "the config has no `evaluate` section (see configs/common.py)")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in section]
        check(not missing, f"config.evaluate lacks field(s) {missing} (see configs/common.py)")
        values = {f.name: section[f.name] for f in dataclasses.fields(cls) if f.name in section}
        values["purify"] = purify_variants.Variant.from_config(section.get("purify"))
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
            check(name not in cascade.REGISTRY or name in attacks.ATTACKS,
                  f"attack {name!r} of evaluate.attacks is not in this version's "
                  f"srdjax.attacks.ATTACKS ({', '.join(attacks.ATTACKS)})")
        check(self.defenses and self.attacks, "evaluate.defenses and evaluate.attacks must "
                                              "each name at least one")
        check(len(set(self.attacks)) == len(self.attacks),
              f"evaluate.attacks names an attack twice: {self.attacks}")
        check(self.curve_attack in CURVE_ATTACKS, f"unknown evaluate.curve_attack "
              f"{self.curve_attack!r}; expected one of {', '.join(CURVE_ATTACKS)}")
        check(self.norm in ("linf", "l2"), f"evaluate.norm must be 'linf' or 'l2', got "
                                           f"{self.norm!r}")
        square_l2 = cascade._accepts(attacks.square, "norm")
        check(self.norm == "linf" or square_l2 or ("square" not in self.attacks
                                                   and self.curve_attack != "square"),
              "this version's square attack is L∞ only; drop it from evaluate.attacks (and "
              "curve_attack) or use evaluate.norm='linf'")
        check(self.compare in DEFENSES and self.compare != "pgd_at",
              f"evaluate.compare must name the defense compared with PGD-AT, one of "
              f"{', '.join(n for n in DEFENSES if n != 'pgd_at')}; got {self.compare!r}")
        top = eps_limit(self.norm, image_size)
        unit = "L∞, pixel units: 8/255 = 0.0314" if self.norm == "linf" else "L2, pixel units"
        for name, value in [("eps", self.eps)] + [("eps_list", e) for e in self.eps_list]:
            check(isinstance(value, (int, float)) and 0.0 <= value <= top,
                  f"evaluate.{name} must lie in [0, {top:.4g}] ({unit}), got {value!r}")
        for name in ("batch_size", "pgd20_steps", "pgd100_steps", "pgd100_restarts",
                     "apgd_steps", "n_target_classes", "fab_steps", "square_queries",
                     "transfer_steps", "selector_steps", "surrogate_steps", "surrogate_top",
                     "eot_samples"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1,
                  f"evaluate.{name} must be an integer >= 1, got {value!r}")
        check(isinstance(self.resume, bool), f"evaluate.resume must be True or False, got "
                                             f"{self.resume!r}")
        check(self.test_per_class >= 0 and self.curve_per_class >= 0,
              "evaluate.test_per_class and curve_per_class must be >= 0 (0: all)")
        check(self.subset in ("report", "screen"), f"evaluate.subset must be 'report' or "
                                                   f"'screen', got {self.subset!r}")
        check(self.subset == "report" or (self.test_per_class >= 1 and self.report_per_class >= 1),
              f"evaluate.subset='screen' needs test_per_class >= 1 and report_per_class >= 1 "
              f"(the report subset it avoids), got {self.test_per_class} and "
              f"{self.report_per_class}")
        for name, ok, expected in (
                ("surrogate_temperature", self.surrogate_temperature > 0, "> 0"),
                ("blur_sigma", self.blur_sigma > 0, "> 0"),
                ("jpeg_quality", 1 <= self.jpeg_quality <= 100, "an integer in [1, 100]"),
                ("bit_depth", 1 <= self.bit_depth <= 16, "an integer in [1, 16]"),
                ("unbounded_max", 0 <= self.unbounded_max <= 1, "in [0, 1]")):
            check(ok, f"evaluate.{name} must be {expected}, got {getattr(self, name)!r}")

    def attack_settings(self, name: str) -> dict:
        """What the report states about how attack `name` was run."""
        if name in cascade.REGISTRY:
            return cascade.registry_settings(name, self)
        if name in TRANSFER_SOURCES:
            return {"steps": self.transfer_steps, "source": f"{TRANSFER_SOURCES[name]} (bare)"}
        if name == "selector":
            return {"steps": self.selector_steps}
        return {"steps": self.surrogate_steps, "top": self.surrogate_top,
                "temperature": self.surrogate_temperature}

    def setup(self) -> dict:
        """How the run is made, for the report."""
        return {"attacks": list(self.attacks),
                "attack_settings": {a: self.attack_settings(a) for a in self.attacks},
                **{k: getattr(self, k) for k in ("test_per_class", "seed", "batch_size", "norm",
                                                 "eps", "curve_attack", "unbounded_max",
                                                 "eot_samples", "compare", "subset",
                                                 "report_per_class")},
                "purify": self.purify.describe()}


def eps_limit(norm: str, image_size) -> float:
    """The largest meaningful ε: any image of [0, 1]^d is within it of any other."""
    h, w = image_size
    return 1.0 if norm == "linf" else math.sqrt(h * w * 3)


# ------------------------------------------------------------------------------ defenses


def make_defense(name: str, classifier: Classifier, purifier=None, s: Settings | None = None):
    """Defense `name` of DEFENSES around `classifier`; `s` gives JPEG quality, bits, blur σ and
    the purify variant (whose λ and sparsity `purifier` must already have: `load_defenses`)."""
    transform = DEFENSES[name][0]
    option = None if s is None else {"jpeg": s.jpeg_quality, "bit_depth": s.bit_depth,
                                     "blur": s.blur_sigma, "purify": s.purify}.get(transform)
    return Defense(name, transform, option, classifier,
                   purifier if transform == "purify" else None)


def _sources(s: Settings) -> set:
    """The classifier stages the transfer attacks start from."""
    return {TRANSFER_SOURCES[a] for a in s.attacks if a in TRANSFER_SOURCES}


def check_stages(ctx: stages.Context, s: Settings) -> None:
    """One error naming every missing stage and what needs it."""
    needed: dict[str, list[str]] = {}
    for name in s.defenses:
        transform, stage = DEFENSES[name]
        for st in (stage,) + (PURIFY_STAGES if transform == "purify" else ()):
            needed.setdefault(st, []).append(f"defense {name}")
    for a in s.attacks:
        if a in TRANSFER_SOURCES:
            needed.setdefault(TRANSFER_SOURCES[a], []).append(f"the {a} attack")
    missing = [st for st in needed if not ctx.store(st).is_done()]
    check(not missing, f"{ctx.workdir} has no finished stage " + "; ".join(
        f"'{st}' (needed by {', '.join(needed[st])})" for st in missing)
        + ": run train.py with it in config.stages, or leave out what needs it")


def load_defenses(workdir, s: Settings, mesh=None):
    """(context, {name: Defense}, {stage: bare classifier as a Defense} for the transfer
    attacks, the settings with the purify variant's λ and sparsity as used) from a finished
    train.py workdir."""
    config = stages.load_config(workdir)
    config.workdir = str(workdir)
    ctx = stages.Context(config, mesh)
    check_stages(ctx, s)
    wanted = {DEFENSES[n][1] for n in s.defenses} | _sources(s)
    classifiers = {st: Classifier(*stages.load_classifier(ctx, st)) for st in sorted(wanted)}
    purifier = None
    if any(DEFENSES[n][0] == "purify" for n in s.defenses):
        purifier, used = purify_variants.apply(stages.build_purifier(ctx), s.purify)
        purifier, s = parallel.replicate(ctx.mesh, purifier), dataclasses.replace(s, purify=used)
    built = {n: make_defense(n, classifiers[DEFENSES[n][1]], purifier, s) for n in s.defenses}
    sources = {st: Defense(f"bare_{st}", "none", None, classifiers[st]) for st in _sources(s)}
    return ctx, built, sources, s


# ------------------------------------------------------------------------------ resuming

# The code that decides an attack cell's result (modules, or packages: every .py in them): a
# saved cell is reused only when it is byte for byte the code that computed it. The reports
# (srdjax.report, srdjax.stats) are not among them: rewording a report keeps the cells.
RESULT_MODULES = ("attacks", "cascade", "cluster_choice", "clusters", "defenses", "dictionary",
                  "evaluation", "frequency", "models", "omp", "parallel", "patches", "purifier",
                  "purify_variants", "resynthesis")


@functools.lru_cache(maxsize=None)
def code_hash() -> str:
    h = hashlib.sha256(f"jax {jax.__version__}".encode())
    root = Path(__file__).parent
    for name in RESULT_MODULES:
        files = (sorted((root / name).rglob("*.py")) if (root / name).is_dir()
                 else [root / f"{name}.py"])
        for f in files:
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _stage_stamps(ctx: stages.Context, names) -> dict:
    """Each finished stage's DONE.json, hashed (it changes whenever the stage is re-run)."""
    return {st: hashlib.sha256(ctx.store(st).done_path.read_bytes()).hexdigest()[:16]
            for st in names if ctx.store(st).is_done()}


def _defense_stages(d: Defense) -> tuple:
    return (DEFENSES[d.name][1],) + (PURIFY_STAGES if d.transform == "purify" else ())


def predict_correct(d: Defense, x, y, s: Settings, mesh) -> np.ndarray:
    return cascade.predict(d, x, np.arange(len(y)), s.batch_size, mesh) == y


# ------------------------------------------------------------------------------ the run


def evaluate(config, mesh=None, stop_after: int | None = None) -> dict:
    """Run the whole evaluation of `config.workdir`; write the reports and return the results.
    `stop_after`: stop (raise cascade.CascadeStopped) after that many computed cells, as a
    killed run would."""
    s = Settings.from_config(config)
    out = str(config.evaluate.get("output", "") or "evaluation")
    check("/" not in out and out not in (".", ".."),
          f"evaluate.output must be a folder name inside the workdir, got {out!r}")
    t0 = time.time()
    ctx, built, sources, s = load_defenses(Path(config.workdir).expanduser(), s, mesh)
    data_config = config.data.copy_and_resolve_references()
    data_config.test_per_class = 0
    test = load_dataset(data_config, "test", s.seed)
    index = evaluated_subset(test.y, s)
    x, y = test.x[index].astype(np.float32) / 255.0, test.y[index].astype(np.int32)
    # Batches no larger than the images need: fewer, smaller programs to compile.
    s = dataclasses.replace(s, batch_size=min(s.batch_size, len(y)))
    clean = {n: predict_correct(d, x, y, s, ctx.mesh) for n, d in built.items()}
    cache = cascade.CellCache(ctx.workdir / out / "cells", _stage_stamps(ctx, set(
        st for d in built.values() for st in _defense_stages(d)) | set(sources)), code_hash(),
        read=s.resume)
    purified = next((d for d in built.values() if d.transform == "purify"), None)
    shared = cascade.SharedImages(x, y, s, ctx.mesh, sources, purified)

    def run(d, names, eps, subset=None, shared_images=None, part="curve"):
        return cascade.run(d, names, x, y, clean[d.name], eps=eps, s=s, mesh=ctx.mesh,
                           cache=cache, subset=subset, shared=shared_images, part=part,
                           stop_after=stop_after, stages_used=_defense_stages(d),
                           cell_parts={"defense": [d.name, d.transform, d.option]})

    broken_by, seconds = {}, {}
    for n, d in built.items():
        broken_by[n], seconds[n] = run(d, s.attacks, s.eps, shared_images=shared,
                                       part="cascade")

    # The ε curve and the sanity checks: the curve attack alone, on a class-balanced part of
    # the evaluated images.
    sub = (np.arange(len(y)) if not s.curve_per_class
           else class_balanced_subset(y, s.curve_per_class, s.seed))
    curve = {eps: {n: run(d, (s.curve_attack,), eps, sub)[0] for n, d in built.items()}
             for eps in sorted(set(map(float, s.eps_list)) | {0.0})}
    unbounded_eps = eps_limit(s.norm, x.shape[1:3])
    unbounded = {n: run(d, (s.curve_attack,), unbounded_eps, sub)[0] for n, d in built.items()}
    selector = None
    if purified is not None and "selector" in s.attacks:
        selector = _selector_outcome(purified, shared, x, y, s, ctx.mesh, cache)

    result = report.summarize(
        s.setup(), broken_by, seconds,
        applies={n: [a for a in s.attacks if cascade.applies(a, d)] for n, d in built.items()},
        curve=curve, unbounded=unbounded, unbounded_eps=unbounded_eps, selector=selector,
        workdir=str(ctx.workdir), run_time=time.time() - t0)
    result["output"] = str(ctx.workdir / out)
    result["purify"] = s.purify.describe()
    result["subset"] = {"name": s.subset, "report_per_class": s.report_per_class}
    # Cells read from an earlier, killed run keep the seconds they took then.
    result["cells"] = {"run": cache.computed, "resumed": cache.reused,
                       "attack_seconds": round(sum(v or 0.0 for per in seconds.values()
                                                   for v in per.values()), 1)}
    report.write_reports(ctx.workdir / out, result, per_image={
        "test_index": index, "y": y, **{f"{n}/broken_by": v for n, v in broken_by.items()}})
    return result


def _selector_outcome(d: Defense, shared, x, y, s: Settings, mesh, cache) -> dict:
    """Per image: does purify's choice leave the true class after the selector attack, and
    does it keep it clean (a saved cell like the attacks'). The choice is the variant's own:
    the cluster's class, or for top_classes whether the true class is among the top."""
    rows = np.arange(len(y))
    key = cache.key("selector_success", PURIFY_STAGES, eps=float(s.eps), seed=s.seed,
                    images=cascade._array_hash(x, y), norm=s.norm,
                    settings=s.attack_settings("selector"), variant=d.option)
    saved = cache.load(key, rows)
    if saved is None:
        adv = shared.images("selector", s.eps)
        wrong = ~_true_choice(d, adv, y, s, mesh)
        cache.save(key, rows, wrong, 0.0, f"selector success at eps {s.eps:.6g}")
    else:
        wrong = saved[0]
    return {"wrong": wrong, "true_cluster": _true_choice(d, x, y, s, mesh)}


_true_choice_jit = jax.jit(purify_variants.true_choice, static_argnums=0)


def _true_choice(d: Defense, images, y, s: Settings, mesh) -> np.ndarray:
    """Per image: does the purify variant's choice keep the true class?"""
    rows = np.arange(len(images))
    size, batches = cascade.plan(len(rows), s.batch_size, mesh)
    variant = d.option if d.option is not None else purify_variants.NEAREST
    parts = []
    for lo, hi in batches:
        xb, yb, _ = cascade._batch(mesh, rows, lo, hi, size, images, y)
        parts.append(parallel.to_host(_true_choice_jit(variant, d.purifier, xb, yb))[:hi - lo])
    return np.concatenate(parts)


def evaluated_subset(y, s: Settings) -> np.ndarray:
    """Indices of the evaluated test images. "report": `test_per_class` seeded picks per class
    (all images when 0). "screen": `test_per_class` per class from the images outside the
    report subset of `report_per_class` per class, so a variant screened on one is reported on
    images it was not chosen on."""
    if s.subset == "report":
        return (np.arange(len(y)) if not s.test_per_class
                else class_balanced_subset(y, s.test_per_class, s.seed))
    report_rows = class_balanced_subset(y, s.report_per_class, s.seed)
    return class_balanced_subset(y, s.test_per_class, s.seed, exclude=report_rows)
