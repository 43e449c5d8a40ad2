"""The reports of an evaluation: accuracies, worst case, verdict, sanity checks, Markdown, JSON,
the ε curve figure, and the saved cells read back.

Nothing here decides an attack's outcome, so it is not among `evaluation.RESULT_MODULES`: the
saved cells of a long evaluation stay valid when the reports' code or wording changes.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np

from srdjax import parallel
from srdjax.checkpoints import atomic_write_json, atomic_write_text
from srdjax.checks import check

if TYPE_CHECKING:
    from srdjax import evaluation


def worst_case(clean: np.ndarray, under_attack: dict) -> np.ndarray:
    """Per image: correct clean and under every attack (the minimum over attacks)."""
    return np.min(np.stack([clean] + list(under_attack.values())), axis=0)


def _machine() -> dict:
    import platform
    devices = jax.devices()
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "devices": f"{len(devices)} x {devices[0].device_kind}"}


def summarize(s: evaluation.Settings, clean, main, curve, *, clean_sub, unbounded,
              unbounded_eps, true_cluster, workdir, run_time) -> dict:
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


# What `evaluation.attack_matrix` writes into a saved cell:
# "<defense> under <attack> at eps <ε>, <n> images".
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
