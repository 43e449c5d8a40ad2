"""The reports of an evaluation: accuracies with exact intervals, the verdict against PGD-AT,
sanity checks, Markdown, JSON, the ε curve figure, and the saved cells read back.

It is fed plain results -- per defense the per-image `broken_by` array of the cascade (see
`srdjax.stats`), seconds, and a dict of how the attacks were run -- and imports nothing of the
evaluation, so rewording a report leaves the saved attack cells valid.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import re
from pathlib import Path

import jax
import numpy as np

from srdjax import parallel, stats
from srdjax.checkpoints import atomic_write_json, atomic_write_text
from srdjax.checks import check


def _machine() -> dict:
    devices = jax.devices()
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "devices": f"{len(devices)} x {devices[0].device_kind}"}


def _acc(v) -> float:
    return float(np.mean(v))


def _interval(v) -> list[float]:
    """The exact 95% interval of the proportion of True in v."""
    return list(stats.clopper_pearson(int(np.sum(v)), int(np.size(v))))


def summarize(setup: dict, broken_by: dict, seconds: dict, *, applies: dict, curve: dict,
              unbounded: dict, unbounded_eps: float, selector: dict | None, workdir: str,
              run_time: float) -> dict:
    """Accuracies, intervals, the verdict, curve and sanity checks as one JSON-able dict.

    setup: how the run was made (attacks in cascade order, attack_settings, norm, eps, seed,
    test_per_class, batch_size, curve_attack, unbounded_max, eot_samples, compare).
    broken_by: {defense: [n] int}; seconds: {defense: {attack: s}}; applies: {defense: [attacks
    run on it]}; curve: {ε: {defense: broken_by of the curve attack alone on the curve images}};
    unbounded: {defense: the same at `unbounded_eps`}; selector: {"wrong", "true_cluster"}
    per-image booleans, or None."""
    attacks, names = list(setup["attacks"]), list(broken_by)
    after = {n: {a: (_acc(stats.survived(broken_by[n], j)) if a in applies[n] else None)
                 for j, a in enumerate(attacks)} for n in names}
    counts = {n: {a: (int(np.sum(broken_by[n] == j)) if a in applies[n] else None)
                  for j, a in enumerate(attacks)} for n in names}
    clean = {n: broken_by[n] != stats.CLEAN_ERROR for n in names}
    robust = {n: stats.survived(broken_by[n]) for n in names}
    eps_values = sorted(curve)
    curve_acc = {n: [_acc(stats.survived(curve[e][n])) for e in eps_values] for n in names}
    # At ε = 0 the attack returns x: any image it "breaks" is an error of the evaluation.
    mismatches = {n: int(np.sum(curve[0.0][n] == 0)) for n in names} if 0.0 in curve else {}
    rises = [{"defense": n, "from_eps": eps_values[i], "to_eps": eps_values[i + 1],
              "from": curve_acc[n][i], "to": curve_acc[n][i + 1]}
             for n in names for i in range(len(eps_values) - 1)
             if curve_acc[n][i + 1] > curve_acc[n][i]]
    unbounded_acc = {n: _acc(stats.survived(v)) for n, v in unbounded.items()}
    flagged = [n for n, v in unbounded_acc.items() if v > setup["unbounded_max"]]
    sel = None
    if selector is not None:
        wrong, true = selector["wrong"], selector["true_cluster"]
        sel = {"success_rate": _acc(wrong), "clean_true_cluster_rate": _acc(true),
               "switched_from_true_cluster": _acc(wrong[true]) if true.any() else None}
    sanity = {
        "eps0_equals_clean": {"passed": not any(mismatches.values()), "mismatches": mismatches},
        "monotone_in_eps": {"passed": not rises, "rises": rises},
        "unbounded": {"eps": unbounded_eps, "attack": setup["curve_attack"],
                      "robust": unbounded_acc, "max_allowed": setup["unbounded_max"],
                      "flagged": flagged, "passed": not flagged},
        "selector_success_rate": None if sel is None else sel["success_rate"]}
    sanity["passed"] = all(sanity[k]["passed"] for k in
                           ("eps0_equals_clean", "monotone_in_eps", "unbounded"))
    secs = {n: {a: seconds[n].get(a) for a in attacks} for n in names}
    verdict, versus = verdict_against_pgd_at(setup["compare"], robust)
    n_images = int(len(next(iter(broken_by.values()))))
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": _machine(), "run_time_s": round(run_time, 1), "workdir": workdir,
        "n": n_images, **{k: setup[k] for k in ("test_per_class", "seed", "batch_size", "norm",
                                                "eps", "compare")},
        "defenses": names, "attacks": attacks, "attack_settings": setup["attack_settings"],
        "clean": {n: _acc(clean[n]) for n in names},
        "clean_interval": {n: _interval(clean[n]) for n in names},
        "robust_after": after, "broken_by": counts,
        "worst_case": {n: _acc(robust[n]) for n in names},
        "worst_case_interval": {n: _interval(robust[n]) for n in names},
        "worst_case_over": {n: [a for a in attacks if a in applies[n]] for n in names},
        "seconds": secs,
        "seconds_per_attack": {a: sum(v[a] or 0.0 for v in secs.values()) for a in attacks},
        "selector": sel,
        "curve": {"attack": setup["curve_attack"],
                  "n": int(len(next(iter(curve[eps_values[0]].values())))),
                  "eps": eps_values, "robust": curve_acc},
        "sanity": sanity,
        "eot": ("Every defense evaluated here is deterministic (purification, JPEG, bit depth and "
                "blur draw no random numbers), so EOT reduces to the plain attack; "
                f"eot_samples = {setup['eot_samples']} applies only to defenses flagged random."),
        "verdict": verdict, "versus_pgd_at": versus}


def verdict_against_pgd_at(compare: str, robust: dict, alpha: float = 0.05):
    """The sentence the reports lead with, and the paired comparison behind it: the defense
    `compare`, named in the config before the run, against PGD-AT on the same images (per-image
    booleans of surviving every attack). "Beats" only when the exact McNemar test rejects
    equality (p < alpha, two-sided) and `compare` keeps more images."""
    missing = [n for n in (compare, "pgd_at") if n not in robust]
    if missing:
        return (f"{' and '.join(missing)} not among this run's defenses, so {compare} is not "
                "compared with PGD-AT."), None
    c = stats.paired_difference(robust[compare], robust["pgd_at"], alpha)
    ours, theirs = 100 * _acc(robust[compare]), 100 * _acc(robust["pgd_at"])
    level = round(100 * (1 - alpha))
    detail = (f"difference {100 * c['difference']:+.1f} points, exact {level}% interval "
              f"{100 * c['low']:+.1f} to {100 * c['high']:+.1f}; images kept only by {compare}: "
              f"b = {c['b']}, only by PGD-AT: c = {c['c']}, exact McNemar p = {c['p_value']:.3g}, "
              f"n = {c['n']}")
    significant = c["p_value"] < alpha
    if significant and c["b"] > c["c"]:
        text = (f"{compare} beats PGD-AT under the worst case over these attacks: {ours:.1f}% "
                f"vs {theirs:.1f}% ({detail}).")
    elif significant:
        text = (f"PGD-AT beats {compare} under the worst case over these attacks: {theirs:.1f}% "
                f"vs {ours:.1f}% ({detail}).")
    else:
        text = (f"{compare} does not beat PGD-AT under the worst case: {ours:.1f}% vs "
                f"{theirs:.1f}%, a difference within chance ({detail}).")
    return text, {"defense": compare, **c}


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


# What `srdjax.cascade` writes into a saved cell's description:
# "<defense> under <attack> at eps <ε>: <k> of <n> images attacked (<part>)", part "cascade"
# (the main run) or "curve" (the curve attack alone, for the ε curve and sanity checks).
CELL_TEXT = "{defense} under {attack} at eps {eps:.6g}: {k} of {n} images attacked ({part})"
_CELL_RE = re.compile(r"(?P<defense>\S+) under (?P<attack>\S+) at eps (?P<eps>\S+): "
                      r"(?P<k>\d+) of (?P<n>\d+) images attacked \((?P<part>\w+)\)")


def saved_cells(directory) -> tuple[list[dict], int]:
    """The cascade cells saved in an evaluation's `cells/` folder, read from their own
    descriptions (dicts of defense, attack, eps, n, rows attacked, correct per attacked row
    after the attack, seconds, file), and how many older files of the same cells were passed
    over. `part`: "cascade" (the main run's cells) or "curve".

    It reads files only: no model, and whatever code or data made them (a cell's file name is a
    hash of those, which only the run that made it can match). Of files with the same defense,
    attack, ε and n, the newest is kept. Other files (selector success, unreadable ones) are
    left out."""
    found, older = {}, 0
    for path in sorted(Path(directory).glob("*.npz"), key=lambda q: (q.stat().st_mtime, q.name)):
        try:
            with np.load(path, allow_pickle=False) as f:
                text, correct, rows = str(f["description"]), f["values"], f["rows"]
                seconds = float(f["seconds"])
        except (OSError, ValueError, KeyError):
            continue
        m = _CELL_RE.fullmatch(text)
        if (m is None or correct.dtype != bool or correct.shape != (int(m["k"]),)
                or rows.shape != correct.shape):
            continue
        cell = dict(defense=m["defense"], attack=m["attack"], eps=float(m["eps"]), n=int(m["n"]),
                    part=m["part"], rows=rows, correct=correct, seconds=seconds, file=path.name)
        what = (cell["defense"], cell["attack"], cell["eps"], cell["n"], cell["part"])
        older += what in found
        found[what] = cell
    return list(found.values()), older


def saved_cells_markdown(directory, eps: float | None = None, norm: str = "linf",
                         order=()) -> str:
    """A progress table of an unfinished evaluation from its saved cells at one ε (default: the ε
    of most cells): per defense, % of the n images still classified correctly after each saved
    attack of its cascade (and every earlier one), and after the last one saved. Columns follow
    `order` (the configured attack order), then any other attack found."""
    cells, older = saved_cells(directory)
    cells = [c for c in cells if c["part"] == "cascade"]
    check(bool(cells), f"no saved evaluation cells in {directory}")
    if eps is None:
        counts = {}
        for c in cells:
            counts[c["eps"]] = counts.get(c["eps"], 0) + 1
        eps = max(counts, key=lambda e: (counts[e], e))
    cells = [c for c in cells if math.isclose(c["eps"], eps, rel_tol=1e-5)]
    check(bool(cells), f"no saved cells at eps {eps:.6g} in {directory}")
    defenses = list(dict.fromkeys(c["defense"] for c in cells))
    found = list(dict.fromkeys(c["attack"] for c in cells))
    attacks = [a for a in order if a in found] + [a for a in found if a not in order]
    table = {(c["defense"], c["attack"]): c for c in cells}
    rows = []
    for d in defenses:
        mine = [table[d, a] for a in attacks if (d, a) in table]
        left = min(int(c["correct"].sum()) / c["n"] for c in mine)
        rows.append([d] + [_pct(table[d, a]["correct"].sum() / table[d, a]["n"])
                           if (d, a) in table else "–" for a in attacks]
                    + [_pct(left), len(mine)])
    ns = sorted({c["n"] for c in cells})
    lines = [f"Saved cells in {directory} at ε = {_eps_text(eps, norm)}, "
             f"n = {', '.join(map(str, ns))} images: % still correct after each attack of the "
             "cascade (and every earlier one); – : not saved (yet).", ""]
    lines += _table(["defense"] + attacks + ["robust so far", "cells"], rows)
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


def _attack_text(r: dict) -> str:
    def one(a):
        settings = ", ".join(f"{k} {v}" for k, v in r["attack_settings"][a].items())
        return f"{a} ({settings})" if settings else a
    return "; ".join(one(a) for a in r["attacks"])


def _variant_text(r: dict) -> str:
    """How purification and the images were set (evaluate.purify, evaluate.subset)."""
    v, sub = r.get("purify"), r.get("subset")
    text = ""
    if v:
        top = f" (top {v['top']})" if v["choice"] == "top_classes" else ""
        text += (f" Purification: cluster choice {v['choice']}{top}, Tikhonov λ {v['lam']:g}, "
                 f"OMP sparsity {v['sparsity']}.")
    if sub and sub["name"] == "screen":
        text += (f" Images: the screening subset, disjoint from the report subset of "
                 f"{sub['report_per_class']} per class.")
    return text


def render_markdown(r: dict) -> str:
    """The report: the main table (defenses × the cascade's attacks, accuracy in %) first."""
    m, norm = r["machine"], r["norm"]
    per = f"{r['test_per_class']} per class" if r["test_per_class"] else "the whole test set"
    ci = lambda v: f"{100 * v[0]:.1f}–{100 * v[1]:.1f}"  # noqa: E731
    lines = [f"# srdjax evaluation of {r['workdir']}", "",
             f"{r['date']}; {m['platform']}, {m['cpu_count']} CPUs, jax {m['jax']} on "
             f"{m['devices']}; run time {r['run_time_s']:.0f} s{_resumed_text(r)}.", "",
             f"Test images: n = {r['n']} ({per}, seed {r['seed']}). Threat model: "
             f"{'L∞' if norm == 'linf' else 'L2'}, ε = {_eps_text(r['eps'], norm)}. The attacks "
             "run as a cascade, in the order of the columns, each on the images every earlier "
             "one failed to break. Accuracy in %: a column gives the images still classified "
             "correctly after that attack and every earlier one; worst case: after all of "
             "them, with its exact (Clopper–Pearson) 95% interval. – : does not apply "
             "(selector and surrogate attack the purifier's cluster choice)."
             + _variant_text(r), ""]
    lines += _table(["defense", "clean"] + r["attacks"] + ["worst case", "95% interval"], [
        [n, _pct(r["clean"][n])] + [_pct(r["robust_after"][n][a]) for a in r["attacks"]]
        + [_pct(r["worst_case"][n]), ci(r["worst_case_interval"][n])] for n in r["defenses"]])
    if r["verdict"]:
        lines += ["", f"**{r['verdict']}**"]
    lines += ["", "Images broken by each attack (first in the cascade to break them):", ""]
    lines += _table(["defense"] + r["attacks"], [
        [n] + ["–" if r["broken_by"][n][a] is None else str(r["broken_by"][n][a])
               for a in r["attacks"]] for n in r["defenses"]])
    lines += ["", f"Attacks, in cascade order: {_attack_text(r)}. Gradients: BPDA "
              "straight-through for JPEG and bit depth, exact for the blur, purify_bpda (exact "
              "given the cluster and OMP supports) for purification. " + r["eot"]]
    c, san = r["curve"], r["sanity"]
    e0, mono, unb = san["eps0_equals_clean"], san["monotone_in_eps"], san["unbounded"]
    ok = lambda passed: "passed" if passed else "**FAILED**"  # noqa: E731
    lines += ["", "## Sanity checks", "",
              f"- ε = 0 breaks no image ({c['attack']}, n = {c['n']}): "
              f"{ok(e0['passed'])}; images broken: "
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
    lines += ["", f"## Accuracy (%) against ε ({c['attack']} alone, n = {c['n']})", ""]
    lines += _table(["defense"] + [_eps_text(e, norm) for e in c["eps"]],
                    [[n] + [_pct(v) for v in c["robust"][n]] for n in r["defenses"]])
    lines += ["", "## Seconds per attack (compilation included; transfer and selector images "
              "are made once for every image and charged to the first defense that uses them)",
              ""]
    lines += _table(["defense"] + r["attacks"], [
        [n] + ["–" if r["seconds"][n][a] is None else f"{r['seconds'][n][a]:.1f}"
               for a in r["attacks"]] for n in r["defenses"]])
    return "\n".join(lines) + "\n"


def _cell_value(v: str):
    if v == "–":
        return None
    try:
        return float(v)
    except ValueError:
        return v


def parse_markdown_table(text: str) -> dict:
    """{defense: {column: percent, None or the cell's text}} from the report's first table."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    header = [h.strip() for h in rows[0].strip("|").split("|")]
    out = {}
    for line in rows[2:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(header):
            break
        out[cells[0]] = {h: _cell_value(v) for h, v in zip(header[1:], cells[1:])}
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
