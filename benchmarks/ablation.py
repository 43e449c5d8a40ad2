"""The purifier ablation: every purify-time variant of the srd defense measured by the honest
evaluation, next to PGD-AT on the same images, in one command.

    python benchmarks/ablation.py --config configs/cifar10_quick.py \\
        [--screen-per-class 30] [--report-per-class 100] [--confirm 2] [--out docs/ablation] \\
        [--rows nearest,reconstruction,...] [--config.evaluate.FIELD=VALUE ...]

Rows (`ROWS`): how the cluster is chosen (nearest, the paper; reconstruction; top_classes, k =
3), the frequency cut-off (Tikhonov λ half and double the trained one; as trained is the
nearest row), the OMP sparsity (half and double; as trained is the nearest row), srd_baseline,
the robust classifier alone (latent weight as trained) and PGD-AT (its λ = 0 twin), the
reference. Each variant is one `srdjax.evaluation.evaluate(config)` with `evaluate.purify` and
the defenses overridden, its reports and cells in <workdir>/ablation_<subset>_<variant>/, so a
killed run resumes. Every row is screened on the class-balanced "screen" subset
(`evaluate.subset`, --screen-per-class per class, disjoint from the report subset); the
--confirm best purifier rows by worst case on it (ties: clean accuracy, then row order) are then
evaluated on the report subset (--report-per-class per class) with PGD-AT and the robust
classifier, so no row is reported on the images it was chosen on.

Per row: clean accuracy, worst-case robust accuracy over the cascade `evaluate.attacks`, and the
paired difference of worst cases to PGD-AT with its exact interval and McNemar p (srdjax.stats),
from the per-image results (per_image.npz); each other purifier row is also paired with the
paper's (nearest), and each purifier row gives how often its cluster choice keeps the true class
on clean images and how often the selector attack moves it off. Rows that need training (the
number of clusters, a larger latent weight, training through the purifier: stage purified_at)
are listed with the train.py command that makes their workdir (<workdir>_<row>), and evaluated
like the others once that workdir exists; never filled in otherwise. Writes <out>.md,
<out>.json and <out>.png (clean against worst case, one point per row and subset).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import host, write_json  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    family: str
    setting: str
    defense: str = "srd_robust"
    purify: tuple = ()            # evaluate.purify overrides: ((field, value or factor), ...)
    train: str = ""               # train.py overrides making this row's workdir (<workdir>_<name>)
    note: str = ""

    @property
    def purifier(self) -> bool:
        return self.defense.startswith("srd")


ROWS = (
    Row("nearest", "cluster choice", "nearest cluster of the robust latent (paper; λ and "
        "sparsity as trained)"),
    Row("reconstruction", "cluster choice", "dictionary of lowest reconstruction error",
        purify=(("choice", "reconstruction"),)),
    Row("top_classes_3", "cluster choice", "top-3 classes' rebuilds, probabilities averaged",
        purify=(("choice", "top_classes"), ("top", 3))),
    Row("lam_half", "frequency cut-off", "Tikhonov λ × 0.5", purify=(("lam", 0.5),)),
    Row("lam_double", "frequency cut-off", "Tikhonov λ × 2", purify=(("lam", 2.0),)),
    Row("sparsity_half", "OMP sparsity", "sparsity × 0.5", purify=(("sparsity", 0.5),)),
    Row("sparsity_double", "OMP sparsity", "sparsity × 2", purify=(("sparsity", 2.0),)),
    Row("srd_baseline", "classifier behind the purifier", "baseline classifier",
        defense="srd_baseline"),
    Row("robust", "latent weight", "robust classifier alone (latent weight as trained)",
        defense="robust"),
    Row("pgd_at", "latent weight", "PGD-AT: the twin with latent weight 0 (reference)",
        defense="pgd_at"),
    Row("clusters_one_per_class", "number of clusters", "one cluster per class",
        train="--config.cluster.k_max=1"),
    Row("clusters_up_to_4", "number of clusters", "adaptive k in 2..4, never 1 (there is no "
        "fixed-k option)", train="--config.cluster.k_max=4 --config.cluster.threshold=-1.0"),
    Row("latent_weight_1", "latent weight", "robust model with latent weight 1.0",
        train="--config.robust.latent_weight=1.0"),
    Row("through_purifier", "adversarial training through the purifier", "the robust "
        "classifier fine-tuned on purified adversarial images (FGSM-RS through the defense "
        "plus the cluster-choice margin, stage purified_at)", defense="srd_purified_at",
        train="\"--config.stages=('purified_at',)\""),
)
REFERENCE = "pgd_at"
PAPER = "nearest"            # the paper's purifier: the other purifier rows are paired with it


def _resolve(row: Row, trained) -> dict:
    """The row's evaluate.purify fields: λ and sparsity factors times the trained values."""
    out = {"choice": "nearest", "top": 3, "lam": 0.0, "sparsity": 0}
    for field, value in row.purify:
        if field == "lam":
            value = float(trained.frequency.lam) * value
        elif field == "sparsity":
            value = max(1, int(round(trained.dictionaries.sparsity * value)))
        out[field] = value
    return out


def _train_command(row: Row, args, workdir: Path) -> str:
    if not row.train:
        return ""
    return (f"cp -r {workdir} {workdir}_{row.name} && python train.py --config {args.config} "
            f"--config.workdir={workdir}_{row.name} {row.train}")


def _config(base, workdir, output: str, defenses, purify: dict, subset: str, per_class: int,
            report_per_class: int):
    c = copy.deepcopy(base)
    c.workdir = str(workdir)
    e = c.evaluate
    e.defenses, e.output, e.subset = tuple(defenses), output, subset
    e.compare = next(d for d in defenses if d != REFERENCE)
    e.test_per_class, e.report_per_class = per_class, report_per_class
    for field, value in purify.items():
        e.purify[field] = value
    return c


def _per_image(output: str) -> dict:
    with np.load(Path(output) / "per_image.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _measure(rows, runs: dict, reference) -> list[dict]:
    """Each row's clean and worst-case accuracy and its paired difference to the reference,
    from the per-image results of the run that evaluated it."""
    from srdjax import stats
    ref_out, ref_result = runs[reference]
    ref = _per_image(ref_out)
    theirs = stats.survived(ref[f"{REFERENCE}/broken_by"])
    broken_by = {}
    for row, key in rows:
        per = _per_image(runs[key][0])
        assert np.array_equal(per["test_index"], ref["test_index"]), "rows on different images"
        broken_by[row.name] = per[f"{row.defense}/broken_by"]
    paper = stats.survived(broken_by[PAPER]) if PAPER in broken_by else None
    out = []
    for row, key in rows:
        output, result = runs[key]
        broken = broken_by[row.name]
        ours = stats.survived(broken)
        selector = result.get("selector") if row.purifier else None
        entry = {"row": row.name, "family": row.family, "setting": row.setting,
                 "defense": row.defense, "output": output, "n": int(len(broken)),
                 "clean": float(np.mean(broken != stats.CLEAN_ERROR)),
                 "worst_case": float(np.mean(ours)),
                 "purify": result.get("purify") if row.purifier else None,
                 # How often the variant's choice keeps the true class on clean images, and
                 # how often the selector attack moves it off (srdjax.evaluation).
                 "true_choice_clean": None if selector is None
                 else selector["clean_true_cluster_rate"],
                 "selector_success": None if selector is None else selector["success_rate"],
                 "versus_pgd_at": (None if row.defense == REFERENCE
                                   else stats.paired_difference(ours, theirs)),
                 "versus_paper": (stats.paired_difference(ours, paper)
                                  if row.purifier and paper is not None and row.name != PAPER
                                  else None)}
        out.append(entry)
    return out


def _evaluate_rows(rows, args, base, workdir: Path, subset: str, per_class: int) -> list[dict]:
    """One evaluation per distinct (workdir, purify setting), every row's defense in it."""
    from srdjax import evaluation, stages
    trained = stages.load_config(workdir)
    groups: dict = {}
    for row in rows:
        where = Path(f"{workdir}_{row.name}") if row.train else workdir
        purify = _resolve(row, trained)
        key = (str(where), tuple(sorted(purify.items())))
        label = row.name if (row.train or row.purify) else "paper"
        groups.setdefault(key, {"where": where, "purify": purify, "label": label,
                                "defenses": [], "rows": []})
        groups[key]["defenses"].append(row.defense)
        groups[key]["rows"].append(row)
    # The reference runs with the paper's purify on the trained workdir.
    ref_key = (str(workdir), tuple(sorted(_resolve(ROWS[0], trained).items())))
    groups.setdefault(ref_key, {"where": workdir, "purify": _resolve(ROWS[0], trained),
                                "label": "paper", "defenses": [], "rows": []})
    if REFERENCE not in groups[ref_key]["defenses"]:
        groups[ref_key]["defenses"].insert(0, REFERENCE)
    runs, located = {}, []
    for key, g in groups.items():
        defenses = list(dict.fromkeys(g["defenses"]))
        if defenses == [REFERENCE]:
            defenses.append("robust")   # evaluate compares a defense with PGD-AT: give it one
        config = _config(base, g["where"], f"ablation_{subset}_{g['label']}", defenses,
                         g["purify"], subset, per_class, args.report_per_class)
        print(f"[ablation] {subset}: {g['label']} ({', '.join(defenses)}) in {g['where']}",
              flush=True)
        result = evaluation.evaluate(config)
        runs[key] = (result["output"], result)
        located += [(row, key) for row in g["rows"]]
    return _measure(located, runs, ref_key)


def _best(measured: list[dict], k: int) -> list[str]:
    order = {r.name: i for i, r in enumerate(ROWS)}
    candidates = [m for m in measured if m["defense"].startswith("srd")]
    candidates.sort(key=lambda m: (-m["worst_case"], -m["clean"], order[m["row"]]))
    return [m["row"] for m in candidates[:k]]


# ------------------------------------------------------------------------------ outputs


def _pct(v) -> str:
    return f"{100 * v:.1f}"


def _paired(v, missing: str) -> tuple[str, str, str]:
    if v is None:
        return missing, "", ""
    return (f"{100 * v['difference']:+.1f} [{100 * v['low']:+.1f}, {100 * v['high']:+.1f}]",
            f"{v['p_value']:.3g}", f"{v['b']} / {v['c']}")


def _table(measured: list[dict]) -> list[str]:
    lines = ["| row | what | setting | clean % | worst case % | Δ worst case vs PGD-AT (pts) "
             "[95% exact] | McNemar p | b / c | Δ vs the paper's purifier (pts) [95% exact] | "
             "McNemar p | true class chosen, clean % | selector moved it % |",
             "|" + "---|" * 12]
    for m in measured:
        diff, p, bc = _paired(m["versus_pgd_at"], "reference")
        paper = _paired(m.get("versus_paper"), "")
        chosen = "" if m.get("true_choice_clean") is None else _pct(m["true_choice_clean"])
        moved = "" if m.get("selector_success") is None else _pct(m["selector_success"])
        lines.append(f"| {m['row']} | {m['family']} | {m['setting']} | {_pct(m['clean'])} | "
                     f"{_pct(m['worst_case'])} | {diff} | {p} | {bc} | {paper[0]} | {paper[1]} "
                     f"| {chosen} | {moved} |")
    return lines


def render_markdown(r: dict) -> str:
    s = r["setup"]
    lines = ["# The purifier ablation", "",
             f"Command: `{r['command']}`", "",
             f"Workdir `{s['workdir']}`; attacks (cascade, worst case per image): "
             f"{', '.join(s['attacks'])}; ε = {s['eps']:.6g} ({s['norm']}). Δ: worst-case "
             "accuracy minus PGD-AT's on the same images, exact interval conditional on the "
             "discordant images (b kept only by the row, c only by PGD-AT), exact McNemar p. "
             "The other purifier rows are also paired with the paper's (nearest). True class "
             "chosen: clean images whose cluster choice is of their own class (top_classes: "
             "among the top); selector moved it: attacked images the selector attack moved off "
             "their true class's cluster.", "",
             f"## Screen: {s['screen_per_class']} per class (n = {r['screen']['n']}), disjoint "
             f"from the report subset", ""] + _table(r["screen"]["rows"])
    lines += ["", "Chosen on the screen subset (best worst case): "
              + (f"{', '.join(r['chosen'])}." if r["chosen"]
                 else "none (--confirm 0: no row taken to the report subset)."
                 if s["confirm"] == 0 else "none (no purifier row was screened).")]
    if r["report"] is not None:
        lines += ["", f"## Report: {s['report_per_class']} per class "
                      f"(n = {r['report']['n']})", ""] + _table(r["report"]["rows"])
    if r["not_run"]:
        lines += ["", "## Not run", "", "| row | what | setting | why | command |",
                  "|---|---|---|---|---|"]
    for m in r["not_run"]:
        lines.append(f"| {m['row']} | {m['family']} | {m['setting']} | {m['why']} | "
                     f"{'`' + m['command'] + '`' if m['command'] else ''} |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for part, marker in (("screen", "o"), ("report", "s")):
        if r[part] is None:
            continue
        rows = r[part]["rows"]
        ax.scatter([100 * m["clean"] for m in rows], [100 * m["worst_case"] for m in rows],
                   marker=marker, label=f"{part} (n = {r[part]['n']})")
        for m in rows:
            ax.annotate(m["row"], (100 * m["clean"], 100 * m["worst_case"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("worst-case robust accuracy (%)")
    ax.set_title("Purifier ablation: one point per row")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ main


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--screen-per-class", type=int, default=30)
    parser.add_argument("--report-per-class", type=int, default=100)
    parser.add_argument("--confirm", type=int, default=2)
    parser.add_argument("--out", default="docs/ablation")
    parser.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    args, rest = parser.parse_known_args(argv)
    from srdjax import cli, stages
    from srdjax.checks import check
    cli.quiet_logs()
    base, _ = cli.parse_config_args(rest, "ablation.py", {})
    stages.validate_config(base)
    args.config = next(a.partition("=")[2] or rest[i + 1] for i, a in enumerate(rest)
                       if a.partition("=")[0] == "--config")
    names = [n for n in args.rows.split(",") if n] or [r.name for r in ROWS]
    known = {r.name: r for r in ROWS}
    unknown = [n for n in names if n not in known]
    check(not unknown, f"unknown row(s) {unknown}; known rows: {', '.join(known)}")
    check(args.screen_per_class >= 1 and args.report_per_class >= 1 and args.confirm >= 0,
          "--screen-per-class and --report-per-class must be >= 1, --confirm >= 0")
    workdir = Path(base.workdir).expanduser().resolve()
    chosen_rows = [known[n] for n in names]
    runnable = [r for r in chosen_rows if not r.note and (not r.train
                                                          or Path(f"{workdir}_{r.name}").exists())]
    not_run = [{"row": r.name, "family": r.family, "setting": r.setting,
                "why": r.note or "not run: needs training",
                "command": _train_command(r, args, workdir)}
               for r in chosen_rows if r not in runnable]
    t0 = time.time()
    screen = _evaluate_rows(runnable, args, base, workdir, "screen", args.screen_per_class)
    chosen = _best(screen, args.confirm)
    report = None
    if chosen:
        confirm = [known[n] for n in chosen] + [known["robust"], known[REFERENCE]]
        report = _evaluate_rows(confirm, args, base, workdir, "report", args.report_per_class)
    e = base.evaluate
    result = {
        "command": "python benchmarks/ablation.py " + " ".join(argv),
        "setup": {"workdir": str(workdir), "attacks": list(e.attacks), "eps": float(e.eps),
                  "norm": e.norm, "seed": int(e.seed), "screen_per_class": args.screen_per_class,
                  "report_per_class": args.report_per_class, "confirm": args.confirm},
        "screen": {"n": screen[0]["n"], "rows": screen},
        "chosen": chosen,
        "report": None if report is None else {"n": report[0]["n"], "rows": report},
        "not_run": not_run, "run_time_s": round(time.time() - t0, 1), "host": host()}
    out = Path(args.out)
    write_json(out.with_suffix(".json"), result)
    out.with_suffix(".md").write_text(render_markdown(result))
    plot(result, out.with_suffix(".png"))
    print(render_markdown(result))
    return result


if __name__ == "__main__":
    from srdjax import xla_env
    xla_env.configure()  # before anything imports jax
    from srdjax.cli import guarded, debug_requested
    sys.exit(guarded(lambda: (main(), 0)[1], debug_requested(sys.argv[1:])))
