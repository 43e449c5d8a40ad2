"""Orbax checkpoints per stage, and how a stage finds the one before it.

Layout of a workdir:
    <workdir>/<stage>/ckpt/<step>/   orbax CheckpointManager steps: {"state": pytree, "meta": json}
    <workdir>/<stage>/final/         the stage's result, read by later stages
    <workdir>/<stage>/DONE.json      written (atomically) when the stage has finished
    <workdir>/<stage>/final.sha256.json, ckpt.sha256.json   sha256 of every file of final/ and
                                     of each ckpt/<step>/, written after the save, verified at load
    <workdir>/<stage>/metrics.jsonl  the stage's log

A stage counts as complete only through DONE.json, which records the fingerprint of the config
sections the stage depends on. Running another config into the same workdir is refused with the
first differing field, instead of silently mixing results. A saved file whose bytes changed
since (a damaged disk, a partial copy) is refused at load with the stage, the file and what to
delete to redo it. Workdirs written before checksums existed load unverified.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from srdjax.checks import SrdjaxError


def _jsonable(tree) -> Any:
    if hasattr(tree, "to_dict"):
        tree = tree.to_dict()
    if isinstance(tree, dict):
        return {str(k): _jsonable(v) for k, v in sorted(tree.items())}
    if isinstance(tree, (list, tuple)):
        return [_jsonable(v) for v in tree]
    if isinstance(tree, (np.generic,)):
        return tree.item()
    return tree


def fingerprint(sections: dict) -> tuple[str, dict]:
    """(hash, canonical json) of the config sections a stage depends on."""
    canon = _jsonable(sections)
    text = json.dumps(canon, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16], json.loads(text)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=1, default=str) + "\n")


def tree_digest(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, by path relative to it."""
    directory = Path(directory)
    out = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[path.relative_to(directory).as_posix()] = h.hexdigest()
    return out


def _read_json(path: Path, what: str):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SrdjaxError(f"{path} is unreadable ({type(e).__name__}); {what}") from None


def _first_difference(a, b, prefix="") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k, "<missing>") != b.get(k, "<missing>"):
                return _first_difference(a.get(k, "<missing>"), b.get(k, "<missing>"),
                                         f"{prefix}{k}.")
    return f"{prefix.rstrip('.')}: {a!r} there, {b!r} now"


class StageStore:
    """The checkpoints of one stage in a workdir."""

    def __init__(self, workdir, stage: str, sections: dict, max_to_keep: int = 2):
        self.dir = Path(workdir).expanduser().resolve() / stage
        self.stage = stage
        self.fingerprint, self.sections = fingerprint(sections)
        self.max_to_keep = max_to_keep
        self._manager = None

    # -- completion -------------------------------------------------------------------------
    @property
    def done_path(self) -> Path:
        return self.dir / "DONE.json"

    def check_compatible(self) -> None:
        """Refuse a workdir whose checkpoints came from a different config."""
        meta_path = self.dir / "config.json"
        if meta_path.exists():
            try:
                old = json.loads(meta_path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise SrdjaxError(f"{meta_path} is unreadable ({e}); remove the stage dir") from None
            if old.get("fingerprint") != self.fingerprint:
                raise SrdjaxError(
                    f"{self.dir} holds a '{self.stage}' checkpoint from another config "
                    f"({_first_difference(old.get('sections'), self.sections)}); use a new "
                    f"--config.workdir or delete that directory")

    def _record_config(self) -> None:
        """Written with the first checkpoint, so a run that failed before saving anything
        leaves no claim on the workdir."""
        meta_path = self.dir / "config.json"
        if jax.process_index() == 0 and not meta_path.exists():
            atomic_write_json(meta_path, {"fingerprint": self.fingerprint,
                                          "sections": self.sections})

    def is_done(self) -> bool:
        return self.done_path.exists()

    def mark_done(self, summary: dict) -> None:
        self.manager.wait_until_finished()
        self._record_config()
        if jax.process_index() == 0:
            atomic_write_json(self.done_path, {"fingerprint": self.fingerprint, **summary})
        if jax.process_count() > 1:
            # Other processes must not look for DONE.json (next stage) before it exists.
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"srdjax-done-{self.stage}")

    def summary(self) -> dict:
        if not self.is_done():
            raise SrdjaxError(f"stage '{self.stage}' has not finished in {self.dir.parent}")
        return _read_json(self.done_path, f"delete {self.dir} to redo the '{self.stage}' stage")

    # -- integrity --------------------------------------------------------------------------
    def _verify(self, directory: Path, expected: dict, redo: str) -> None:
        """Refuse `directory` if any file differs from the sha256 recorded when it was saved."""
        actual = tree_digest(directory)
        for name in sorted(set(expected) | set(actual)):
            if expected.get(name) != actual.get(name):
                state = ("is missing" if name not in actual else
                         "was not there when it was saved" if name not in expected else
                         "does not match the sha256 saved with it (damaged or changed)")
                raise SrdjaxError(f"stage '{self.stage}': {directory / name} {state}; {redo}")

    def verify(self) -> None:
        """Check what this stage has saved against its checksums (final/ and the training step
        a resume would start from), without loading it: a run checks its workdir before it
        writes anything."""
        if self.is_done():
            if self._final_digest_path().exists():
                self._verify_final()
            return
        step = self.latest_step()
        self.close()
        if step is not None:
            self._verify_step(step)

    def _verify_final(self) -> None:
        self._verify(self.dir / "final", _read_json(self._final_digest_path(),
                                                    self._redo_stage()), self._redo_stage())

    def _verify_step(self, step: int) -> None:
        path = self._ckpt_digest_path()
        expected = (_read_json(path, self._redo_stage()) if path.exists() else {}).get(str(step))
        if expected is not None:
            self._verify(self.dir / "ckpt" / str(step), expected,
                         f"delete {self.dir / 'ckpt' / str(step)} to resume from the step before "
                         f"it, or {self._redo_stage()}")

    def _final_digest_path(self) -> Path:
        return self.dir / "final.sha256.json"

    def _ckpt_digest_path(self) -> Path:
        return self.dir / "ckpt.sha256.json"

    def _redo_stage(self) -> str:
        return (f"delete {self.dir} (and the later stages made from it) and rerun train.py to "
                f"redo the '{self.stage}' stage")

    # -- orbax ------------------------------------------------------------------------------
    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            options = ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=True)
            self._manager = ocp.CheckpointManager(self.dir / "ckpt", options=options)
        return self._manager

    def latest_step(self) -> int | None:
        if not (self.dir / "ckpt").exists():
            return None
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict | None = None) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(_jsonable(meta or {})))
        self._record_config()
        self.manager.save(int(step), args=args, force=True)
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            # Kept for the steps orbax keeps; a step saved just before a kill may lack its
            # entry, and is then restored unverified.
            path = self._ckpt_digest_path()
            digests = _read_json(path, self._redo_stage()) if path.exists() else {}
            kept = {str(s) for s in self.manager.all_steps()}
            digests = {k: v for k, v in digests.items() if k in kept}
            digests[str(int(step))] = tree_digest(self.dir / "ckpt" / str(int(step)))
            atomic_write_json(path, digests)

    def restore(self, target, step: int | None = None):
        """(state, meta) from `step` (default: the latest). `target` gives structure, dtypes
        and shardings; a checkpoint that does not fit it is reported, not half-loaded."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise SrdjaxError(f"no checkpoint of stage '{self.stage}' in {self.dir}")
        self._verify_step(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises ValueError/KeyError/FileNotFoundError variously
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise SrdjaxError(f"checkpoint {self.dir}/ckpt/{step} does not match this config's "
                              f"'{self.stage}' state: {msg}") from None
        return out["state"], out["meta"]

    def save_final(self, tree) -> None:
        """The stage's result (what later stages read), apart from its resumable training
        steps; orbax writes it to a temporary directory and renames it when complete."""
        self._record_config()
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(self.dir / "final", tree, force=True)
        checkpointer.wait_until_finished()
        checkpointer.close()
        if jax.process_index() == 0:  # before DONE.json: a finished stage always has it
            atomic_write_json(self._final_digest_path(), tree_digest(self.dir / "final"))

    def load_final(self, target=None):
        """The finished stage's result; a clear error if the stage never finished or does not
        fit `target` (structure, shapes, dtypes and shardings). Without a target the saved
        tree comes back as nested dicts of arrays (for results whose sizes are data-dependent,
        like the number of clusters)."""
        if not self.is_done():
            raise SrdjaxError(f"checkpoint directory {self.dir.parent} has no finished "
                              f"'{self.stage}' stage; run train.py with that stage first")
        if self._final_digest_path().exists():
            self._verify_final()
        checkpointer = ocp.StandardCheckpointer()
        if target is None:
            # Leaves come back on this process's first device, whatever topology saved them
            # (orbax refuses an untargeted restore across topologies).
            local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            meta = checkpointer.metadata(self.dir / "final").item_metadata
            abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                                   sharding=local), meta)
        else:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            return checkpointer.restore(self.dir / "final", abstract)
        except Exception as e:  # orbax raises ValueError/KeyError/FileNotFoundError variously
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise SrdjaxError(f"{self.dir / 'final'} does not match what this config's "
                              f"'{self.stage}' stage makes: {msg}") from None
        finally:
            checkpointer.close()

    def close(self):
        if self._manager is not None:
            self._manager.close()
            self._manager = None
