"""What a study leaves in its folder: trials.md (the table), history.png, importance.png and best.yaml.

Written from the storage, so any worker's `cnnlab tune` can write them, and the last one to end
writes the whole study.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from ..files import atomic_write_text
from ..formatting import text_table
from .worker import FINISHED, is_surplus


def trial_rows(study) -> list[dict[str, Any]]:
    """One row per trial (surplus trials left out): number, state, value, params, epochs, seconds, note."""
    trials = [t for t in study.get_trials(deepcopy=False) if not is_surplus(t)]
    rows = []
    for t in trials:
        note = str(t.user_attrs.get("note", ""))
        if t.state == TrialState.FAIL:
            retry = next((r.number for r in trials if (r.system_attrs.get("retry_history") or [None])[-1] == t.number), None)
            note = (note or "its worker stopped beating (killed?)") + (f"; re-run as trial {retry}" if retry is not None else "")
        elif t.system_attrs.get("failed_trial") is not None:
            note = (note + "; " if note else "") + f"re-run of trial {t.system_attrs['retry_history'][-1]}"
        value = t.value if t.state == TrialState.COMPLETE else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        rows.append({"trial": t.number, "state": t.state.name, "accuracy": value, "params": dict(t.params),
                     "epochs": len(t.intermediate_values), "seconds": t.user_attrs.get("seconds"),
                     "run_dir": t.user_attrs.get("run_dir"), "host": t.user_attrs.get("host"), "note": note})
    return rows


def table_text(rows: list[dict[str, Any]], names: list[str], markdown: bool = False, metric: str = "test acc") -> str:
    """The trials as a text table (or a Markdown one); `metric` heads the accuracy column."""
    # `names` may repeat a fixed column's name only in theory: a searched setting is always dotted (train.lr)
    columns = ["trial", "state", metric, *names, "epochs", "time", "note"]
    hosts = {row["host"] for row in rows}
    body = []
    for row in rows:
        accuracy = f"{100 * row['accuracy']:.2f}%" if row["accuracy"] is not None else "—"
        seconds = f"{row['seconds']:.1f} s" if row["seconds"] is not None else "—"
        body.append({"trial": str(row["trial"]), "state": row["state"].lower(), metric: accuracy,
                     **{name: _value(row["params"].get(name)) for name in names},
                     "epochs": str(row["epochs"]), "time": seconds, "note": row["note"][:90],
                     # Markdown (trials.md) adds each trial's run folder, and machine when several took part
                     "run folder": (f"{row['host']}:" if len(hosts) > 1 else "") + str(row["run_dir"] or "—")})
    return text_table(body, columns=columns + ["run folder"] if markdown else columns, markdown=markdown)


def metric_for(data) -> str:
    """What trials are compared on: the validation split's accuracy when there is one (the test split
    is then left for the chosen model), else the test split's."""
    return "val_accuracy" if data.val is not None else "test_accuracy"


def metric_label(study) -> str:
    """'validation accuracy' or 'test accuracy': what this study's trial values are."""
    return "validation accuracy" if study.user_attrs.get("cnnlab:metric") == "val_accuracy" else "test accuracy"


def _short_label(study) -> str:
    return "val acc" if metric_label(study).startswith("validation") else "test acc"


def _value(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def history_figure(study, title: str):
    """Accuracy per trial (complete: dots; pruned: crosses at their last epoch) and the best so far."""
    from ..visualize import new_figure

    fig = new_figure(8, 4.5)
    ax = fig.subplots()
    trials = [t for t in study.get_trials(deepcopy=False) if t.state in FINISHED]
    complete = [(t.number, 100 * t.value) for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    pruned = [(t.number, 100 * t.intermediate_values[max(t.intermediate_values)])
              for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    if complete:
        ax.plot(*zip(*complete), "o", color="C0", label="complete trial")
        best, line = -math.inf, []
        for number, value in sorted(complete):
            best = max(best, value)
            line.append((number, best))
        ax.step(*zip(*line), where="post", color="C3", label="best so far")
    if pruned:
        ax.plot(*zip(*pruned), "x", color="0.5", label="pruned (last epoch's accuracy)")
    if not complete and not pruned:
        ax.text(0.5, 0.5, "no finished trials yet", ha="center", va="center", transform=ax.transAxes)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{metric_label(study)} (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def importance_figure(study, title: str):
    """How much each searched setting mattered (Optuna's default importance evaluator)."""
    from ..visualize import new_figure

    fig = new_figure(8, 4.5)
    ax = fig.subplots()
    try:
        importances = _importances(study)
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # too few trials, or no variation to explain
        importances, reason = {}, str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
    else:
        reason = ""
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="C0")
        ax.set_xlabel(f"importance (share of the variation in {metric_label(study)})")
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "parameter importances need at least 2 complete trials\nwith different settings"
                + (f"\n({reason})" if reason else ""), ha="center", va="center")
    ax.set_title(title, fontsize=10)
    return fig


def _importances(study) -> dict[str, float]:
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(complete) < 2:
        return {}
    with warnings.catch_warnings():  # e.g. "importances will be equal" when every trial scored the same
        warnings.simplefilter("ignore")
        return dict(optuna.importance.get_param_importances(study))


def best_config_text(study, space, study_dir: Path) -> tuple[str, Any] | None:
    """The best trial's full configuration as YAML that `cnnlab train --config` reads, and that trial."""
    import yaml

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and t.value is not None]
    if not complete:
        return None
    best = max(complete, key=lambda t: (t.value, -t.number))
    config = space.config({p.name: best.params[p.name] for p in space.params if p.name in best.params})
    header = (f"# The best settings of study {study.study_name}: trial {best.number}, {metric_label(study)} "
              f"{100 * best.value:.2f}% (run folder {best.user_attrs.get('run_dir', '?')}).\n"
              f"# Searched: {', '.join(f'{k}={_value(v)}' for k, v in best.params.items())}.\n"
              f"# Train with it: cnnlab train --config {study_dir / 'best.yaml'}\n")
    return header + yaml.safe_dump(config.to_dict(), sort_keys=False), best


def write_results(study, space, study_dir: Path) -> dict[str, Any]:
    """Write trials.md, history.png, importance.png and best.yaml into the study folder; returns what was written."""
    from ..visualize import save_figure

    names = [p.name for p in space.params]
    rows = trial_rows(study)
    study_dir.mkdir(parents=True, exist_ok=True)
    table = table_text(rows, names, markdown=True, metric=_short_label(study))
    atomic_write_text(study_dir / "trials.md", f"# Study {study.study_name}\n\n{table}\n")
    title = f"study {study.study_name}: {sum(r['state'] in ('COMPLETE', 'PRUNED') for r in rows)} finished trials"
    save_figure(history_figure(study, f"Optimisation history, {title}"), study_dir / "history.png")
    save_figure(importance_figure(study, f"Parameter importances, {title}"), study_dir / "importance.png")
    best = best_config_text(study, space, study_dir)
    written = {"table": table_text(rows, names, metric=_short_label(study)), "rows": rows, "best": None}
    if best is not None:
        text, trial = best
        atomic_write_text(study_dir / "best.yaml", text)
        written["best"] = trial
    return written
