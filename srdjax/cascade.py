"""The attack cascade: for one defense, the attacks in a stated order, each run only on the
images that every earlier attack failed to break (AutoAttack's protocol, extended to the
attacks on the whole defense), one saved cell per (defense, attack, ε).

The result per defense is `broken_by` [n] (see `srdjax.stats`): the position in the order of
the first attack that broke image i, -1 if none did, -2 if the defense misclassifies it clean.
Because every attack's random draws are keyed per image (the image's row id in the evaluated
set, passed as `ids`), an image's fate under an attack does not depend on which other images
share its batch, so the cascade's per-image worst case is the one of running every attack on
every image, at a fraction of the cost.

Attacks by name (`adversarial_images`): the `srdjax.attacks` registry ("fgsm", "pgd20",
"pgd100", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square") through the defense's BPDA
gradient (`attack_logits`); "transfer-<source>": PGD on the bare baseline, robust or PGD-AT
classifier, its images fed to the defense; "selector" and "surrogate": the attacks on the
purifier's cluster choice. Transfer and selector images do not depend on the defense scored,
so they are made once for every image (`SharedImages`) and each defense scores its own rows.

`CellCache` saves each finished cell (the rows attacked and which stayed correct) as it ends,
under a name that hashes everything its result depends on, so a killed evaluation resumes
where it stopped with the same result.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from jax.tree_util import Partial
from tqdm.auto import tqdm

from srdjax import attacks, parallel, stats
from srdjax.checks import check
from srdjax.attacks import whole_defense
from srdjax.report import CELL_TEXT

TRANSFER_SOURCES = {"transfer-baseline": "baseline", "transfer-robust": "robust",
                    "transfer-pgd_at": "pgd_at"}
SHARED = ("selector",) + tuple(TRANSFER_SOURCES)   # images made once, for every image
PURIFIER_ONLY = ("selector", "surrogate")          # they attack the cluster choice
REGISTRY = ("fgsm", "pgd20", "pgd100", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")


def applies(attack: str, d) -> bool:
    return attack not in PURIFIER_ONLY or d.transform == "purify"


def registry_settings(name: str, s) -> dict:
    """The keyword settings of registry attack `name` in the evaluation `s` (Settings)."""
    return {"fgsm": {}, "pgd20": {"steps": s.pgd20_steps, "restarts": 1},
            "pgd100": {"steps": s.pgd100_steps, "restarts": s.pgd100_restarts},
            "apgd-ce": {"steps": s.apgd_steps}, "apgd-dlr": {"steps": s.apgd_steps},
            "apgd-t": {"steps": s.apgd_steps, "n_target_classes": s.n_target_classes},
            "fab-t": {"steps": s.fab_steps, "n_target_classes": s.n_target_classes},
            "square": {"n_queries": s.square_queries}}[name]


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _call(attack, *args, ids, key, norm, **kwargs):
    """attack(*args, key=..., ...) with per-image keys through `ids` where the attack takes
    them, else a key folded with the batch's first row id; `norm` where it takes one."""
    if _accepts(attack, "ids"):
        kwargs["ids"] = ids
    else:
        key = jax.random.fold_in(key, ids[0])
    if _accepts(attack, "norm"):
        kwargs["norm"] = norm
    return attack(*args, key=key, **kwargs)


def adversarial_images(name: str, d, x, y, *, ids, key, eps, s):
    """Adversarial images of the evaluation's attack `name` against defense `d` (for a transfer
    attack, `d` is the bare source classifier as a Defense), with the settings of `s`."""
    common = dict(eps=eps, key=key, ids=ids, norm=s.norm)
    if name == "selector":
        return _call(whole_defense.selector_attack, d.purifier, x, y, steps=s.selector_steps,
                     variant=d.option, **common)
    if name == "surrogate":
        surrogate = whole_defense._defense_surrogate(s.surrogate_top,
                                                     float(s.surrogate_temperature))
        fn = Partial(surrogate, d)
        return _call(attacks.pgd, fn, x, y, steps=s.surrogate_steps, **common)
    fn = Partial(whole_defense.attack_logits, d)
    if name in TRANSFER_SOURCES:
        return _call(attacks.pgd, fn, x, y, steps=s.transfer_steps, **common)
    return _call(attacks.attack_by_name(name, **registry_settings(name, s)), fn, x, y, **common)


@functools.lru_cache(maxsize=None)
def _fused(name: str, s, mesh):
    """adversarial_images as one jitted program run on every device's part of the batch (on
    accelerators, where a loop costs nothing and a dispatch does). Running per device also
    sidesteps an XLA CPU bug of SPMD partitioning ("fft_thunk ... IsMonotonicWithDim0Major")
    with PGD over purify_bpda's FFT gradient. (check_vma=False: the attack loops carry
    per-device values in replicated-looking carries.)"""
    axis = mesh.axis_names[0]

    def run(d, x, y, ids, key, eps):
        return adversarial_images(name, d, x, y, ids=ids, key=key, eps=eps, s=s)

    return jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P(), P(axis), P(axis), P(axis), P(),
                                                           P()),
                                 out_specs=P(axis), check_vma=False))


def _program(name: str, s, mesh):
    """On a CPU the attacks run their loops from the host (see `attacks.LOOPS`)."""
    if attacks.loops._use_host_loops():
        return lambda d, x, y, ids, key, eps: adversarial_images(name, d, x, y, ids=ids, key=key,
                                                                 eps=eps, s=s)
    return _fused(name, s, mesh)


def attack_key(seed: int, attack: str, eps: float):
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(attack.encode()) & 0x7FFFFFFF)
    return jax.random.fold_in(key, int(round(eps * 2 ** 20)))


# ------------------------------------------------------------------------------ batches


def plan(n: int, batch_size: int, mesh) -> tuple[int, list]:
    """Batches of at most `batch_size` rows covering n, all of one size (the last padded by
    repeating its last row): a multiple of the mesh, chosen among quarters of the full batch
    so that a shrinking remainder costs little padding and few compilations."""
    full = batch_size + -batch_size % mesh.size
    quarter = -(-full // 4)
    quarter += -quarter % mesh.size
    size = min(full, max(quarter, -(-n // quarter) * quarter))
    return size, [(i, min(i + size, n)) for i in range(0, n, size)]


def _batch(mesh, rows, lo, hi, size, *arrays):
    idx = rows[np.minimum(np.arange(lo, lo + size), hi - 1)]
    return parallel.shard_global(mesh, *[a[idx] for a in arrays], idx.astype(np.int32))


_predict = jax.jit(lambda d, x: jnp.argmax(whole_defense.defense_logits(d, x), axis=-1))


def predict(d, x, rows, batch_size: int, mesh) -> np.ndarray:
    """The defense's predicted class of x[rows]."""
    size, batches = plan(len(rows), batch_size, mesh)
    return np.concatenate([np.zeros(0, np.int64)] + [
        parallel.to_host(_predict(d, _batch(mesh, rows, lo, hi, size, x)[0]))[:hi - lo]
        for lo, hi in batches])


def attack_rows(name: str, d, x, y, rows, *, eps: float, s, mesh) -> np.ndarray:
    """Adversarial images of attack `name` against `d` for x[rows], on the host."""
    size, batches = plan(len(rows), s.batch_size, mesh)
    program, key = _program(name, s, mesh), attack_key(s.seed, name, eps)
    parts = []
    for lo, hi in batches:
        xb, yb, ids = _batch(mesh, rows, lo, hi, size, x, y)
        parts.append(parallel.to_host(program(d, xb, yb, ids, key, eps))[:hi - lo])
    return np.concatenate(parts)


class SharedImages:
    """Transfer and selector images, made once for every image of the evaluated set at each ε
    (they do not depend on the defense scored): transfer from the bare classifier of its
    source stage, selector on the purifier of `purified`."""

    def __init__(self, x, y, s, mesh, sources: dict, purified=None):
        self.x, self.y, self.s, self.mesh = x, y, s, mesh
        self.sources, self.purified, self.made = sources, purified, {}

    def images(self, name: str, eps: float):
        if (name, eps) not in self.made:
            target = self.purified if name == "selector" else self.sources[TRANSFER_SOURCES[name]]
            self.made[name, eps] = attack_rows(name, target, self.x, self.y,
                                               np.arange(len(self.y)), eps=eps, s=self.s,
                                               mesh=self.mesh)
        return self.made[name, eps]


# ------------------------------------------------------------------------------ resuming


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
    depends on (`parts`: the images attacked and their labels and row ids, ε, the attack's
    settings, seed and batch size, the defense and its options), the DONE.json of every stage
    it loads (a retrained stage has a new one) and `code` (a hash of the code that decides
    results). Change any and the cell runs again. Process 0 reads and writes; in a
    multi-process run it hands what it read to the others. `read=False` recomputes every cell
    (and overwrites the saved ones)."""

    def __init__(self, directory: Path, stage_stamps: dict, code: str, *, read: bool = True):
        self.dir, self.stage_stamps, self.code, self.read = (Path(directory), stage_stamps, code,
                                                             read)
        self.reused, self.computed = 0, 0
        # Cells this run already met (saved or read) and meets again -- the ε curve's cell at the
        # main ε can be the cascade's own: read back even when read=False, and counted as
        # `repeated`, not as resumed from an earlier run.
        self._this_run, self.repeated = set(), 0

    def key(self, what: str, stages_used, **parts) -> str:
        parts = {"what": what, "code": self.code,
                 "stages": {st: self.stage_stamps[st] for st in sorted(set(stages_used))},
                 **parts}
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
        return f"{what}.{digest.hexdigest()[:20]}"

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.npz"

    def load(self, key: str, rows: np.ndarray):
        """(per-row bool, seconds) of a saved cell over exactly `rows`, or None."""
        n = len(rows)
        found, values, seconds = False, np.zeros(n, bool), 0.0
        again = key in self._this_run
        if ((self.read or again) and parallel.is_main_process()
                and self._path(key).exists()):
            try:
                with np.load(self._path(key), allow_pickle=False) as f:
                    values, seconds, saved_rows = f["values"], float(f["seconds"]), f["rows"]
                found = (values.shape == (n,) and values.dtype == bool
                         and np.array_equal(saved_rows, rows))
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
        if again:
            self.repeated += 1
        else:
            self.reused += 1
        self._this_run.add(key)
        return values, seconds

    def save(self, key: str, rows, values: np.ndarray, seconds: float, description: str) -> None:
        self.computed += 1
        self._this_run.add(key)
        if not parallel.is_main_process():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f"{key}.tmp{os.getpid()}.npz"
        np.savez(tmp, values=np.asarray(values, bool), rows=np.asarray(rows, np.int64),
                 seconds=np.float64(seconds), description=np.str_(description))
        os.replace(tmp, self._path(key))


# ------------------------------------------------------------------------------ the cascade


def run(d, attack_names, x, y, clean, *, eps: float, s, mesh, cache: CellCache | None,
        cell_parts: dict, stages_used: tuple, subset=None, shared: SharedImages | None = None,
        stop_after: int | None = None, part: str = "cascade") -> tuple[np.ndarray, dict]:
    """The cascade of `attack_names` (in that order) against defense `d` on x[subset] (default
    all), whose clean correctness per image is `clean` [n]. Returns broken_by [len(subset)]
    (positions in `attack_names`) and {attack: seconds} of the attacks that apply to `d`.

    Each cell's per-row result is saved in `cache` as it ends and read back instead of run
    when its inputs are unchanged. `cell_parts` and `stages_used` add to what its key hashes
    (the defense, its stages); `part` names the run in the cells' descriptions ("cascade", or
    "curve" for the curve attack alone). `stop_after`: raise `CascadeStopped` after that many
    computed cells (to test resuming)."""
    index = np.arange(len(y)) if subset is None else np.asarray(subset)
    broken_by = np.where(clean[index], stats.ROBUST, stats.CLEAN_ERROR)
    seconds = {}
    for position, attack in enumerate(attack_names):
        if not applies(attack, d):
            continue
        local = np.flatnonzero(broken_by == stats.ROBUST)
        rows = index[local]
        if not len(rows):
            seconds[attack] = 0.0
            continue
        used = stages_used + ((TRANSFER_SOURCES[attack],) if attack in TRANSFER_SOURCES else ())
        key = saved = None
        if cache is not None:
            key = cache.key(f"{d.name}.{attack}", used, images=_array_hash(x[rows], y[rows], rows),
                            eps=float(eps), norm=s.norm, seed=s.seed, batch_size=s.batch_size,
                            attack=attack, settings=s.attack_settings(attack),
                            eot_samples=s.eot_samples, **cell_parts)
            saved = cache.load(key, rows)
        if saved is not None:
            correct, seconds[attack] = saved
        else:
            if stop_after is not None and cache is not None and cache.computed >= stop_after:
                raise CascadeStopped(f"stopped after {cache.computed} computed cells")
            start = time.time()
            if attack in SHARED:
                check(shared is not None, f"attack {attack!r} needs the shared images (a "
                                          "SharedImages) of the evaluated set")
                predicted = predict(d, shared.images(attack, eps), rows, s.batch_size, mesh)
            else:
                x_adv = attack_rows(attack, d, x, y, rows, eps=eps, s=s, mesh=mesh)
                predicted = predict(d, x_adv, np.arange(len(rows)), s.batch_size, mesh)
            correct = predicted == y[rows]
            seconds[attack] = time.time() - start
            if cache is not None:
                cache.save(key, rows, correct, seconds[attack], CELL_TEXT.format(
                    defense=d.name, attack=attack, eps=eps, k=len(rows), n=len(index), part=part))
            if parallel.is_main_process():
                tqdm.write(f"{d.name} × {attack} at ε {eps:.4g}: {int(np.sum(~correct))} of "
                           f"{len(rows)} broken in {seconds[attack]:.1f} s")
        broken_by[local[~correct]] = position
    return broken_by, seconds


class CascadeStopped(RuntimeError):
    """Raised by `run(..., stop_after=k)`: what a killed evaluation looks like to a test."""
