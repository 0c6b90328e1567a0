"""`chainrule-report [SWEEP_DIR]`: a sweep's jobs as one table, scaling-law fits and plots.

Writes into SWEEP_DIR/report/ (or --out): report.md (the table, the fits, failed jobs, the
plots), results.csv (one row per job), fits.json, loss_vs_params.png and loss_vs_compute.png
(with the fitted power laws), loss_curves.png (every job's training and validation loss) and,
when jobs differ in numeric overrides, loss_vs_overrides.png. Without SWEEP_DIR: the newest
sweep under ./multirun.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from chainrule.sweeps import plots
from chainrule.sweeps.powerlaw import PowerLaw, fit_power_law, fit_power_law_offset, pareto_frontier
from chainrule.sweeps.results import Job, Sweep, as_number, latest_sweep, load_sweep, numeric_points

PARAMS = {"non_embedding": "num_params_non_embedding", "total": "num_params"}
COMPUTE = "train_flops"

# metrics.json keys in table order: (key, header, format)
COLUMNS = [
    ("val_loss", "val loss", "loss"), ("best_val_loss", "best val loss", "loss"),
    ("val_perplexity", "perplexity", "loss"), ("val_bits_per_char", "bits/char", "loss"),
    ("val_bits_per_dim", "bits/dim", "loss"), ("val_bits_per_sample", "bits/sample", "loss"),
    ("num_params", "params", "count"), ("num_params_non_embedding", "non-emb params", "count"),
    ("train_flops", "train FLOPs", "flops"), ("tokens_seen", "tokens seen", "count"),
    ("wall_time_s", "wall time (s)", "seconds"),
]
CSV_EXTRA = ["train_loss", "val_accuracy", "flops_per_step", "final_step", "tokens_per_s"]


def _format(value: Any, kind: str) -> str:
    number = as_number(value)
    if number is None:
        return "" if value is None else str(value)
    if kind == "count":
        for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(number) >= size:
                return f"{number / size:.3g}{unit}"
        return f"{number:.0f}"
    if kind == "flops":
        return f"{number:.3g}"
    if kind == "seconds":
        return f"{number:.1f}"
    return f"{number:.4f}"


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclasses.dataclass
class Fits:
    """The scaling laws of a sweep (None where the points cannot support one) and why not."""

    params: PowerLaw | None = None
    params_offset: PowerLaw | None = None
    compute: PowerLaw | None = None
    compute_jobs: list[Job] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {name: None if fit is None else fit.as_dict() for name, fit in
                (("loss_vs_params", self.params), ("loss_vs_params_offset", self.params_offset),
                 ("loss_vs_compute_frontier", self.compute))} | {"notes": self.notes}


def _try_fit(fit: Callable[..., PowerLaw], xs, ys, what: str, notes: list[str]):
    try:
        return fit(xs, ys)
    except ValueError as err:
        notes.append(f"{what}: no fit ({err})")
        return None


def fit_scaling(sweep: Sweep, metric: str, params_key: str) -> Fits:
    fits = Fits()
    y_of = lambda job: job.metric(metric)
    _, xs, ys = numeric_points(sweep.jobs, lambda job: job.metric(params_key), y_of)
    fits.params = _try_fit(fit_power_law, xs, ys, "loss vs parameters", fits.notes)
    if len(set(xs)) >= 4:
        fits.params_offset = _try_fit(fit_power_law_offset, xs, ys,
                                      "loss vs parameters with an irreducible term", fits.notes)
    jobs, xs, ys = numeric_points(sweep.jobs, lambda job: job.metric(COMPUTE), y_of)
    frontier = pareto_frontier(xs, ys) if xs else []
    fits.compute_jobs = [jobs[i] for i in frontier]
    fits.compute = _try_fit(fit_power_law, [xs[i] for i in frontier],
                            [ys[i] for i in frontier], "loss vs compute", fits.notes)
    return fits


def table(sweep: Sweep, csv_keys: bool = False) -> tuple[list[str], list[list[Any]]]:
    """The per-job table: job, its varying overrides, status, then the metrics that any job
    has. `csv_keys`: raw values and metrics.json's key names (for the CSV)."""
    present = [c for c in COLUMNS if any(c[0] in job.metrics for job in sweep.jobs)]
    if csv_keys:
        present += [(k, k, "") for k in CSV_EXTRA if any(k in j.metrics for j in sweep.jobs)]
    headers = ["job", *sweep.varying, "status"]
    headers += [key if csv_keys else header for key, header, _ in present]
    rows = []
    for job in sweep.jobs:
        row: list[Any] = [job.num, *(job.value(k) for k in sweep.varying), job.status]
        if csv_keys:
            row += [job.metrics.get(key) for key, _, _ in present]
            row += [job.error or "", str(job.run_dir), " ".join(job.overrides)]
        else:
            row = ["" if v is None else str(v) for v in row]
            row += [_format(job.metrics.get(key), kind) for key, _, kind in present]
        rows.append(row)
    if csv_keys:
        headers += ["error", "run_dir", "overrides"]
    return headers, rows


@dataclasses.dataclass
class Report:
    sweep: Sweep
    fits: Fits
    markdown: str
    paths: dict[str, Path]


def _plots(sweep: Sweep, fits: Fits, out: Path, metric: str, params_key: str) -> dict[str, Path]:
    paths = {}
    y_of = lambda job: job.metric(metric)
    jobs, xs, ys = numeric_points(sweep.jobs, lambda job: job.metric(params_key), y_of)
    if jobs:
        laws = [(name, fit) for name, fit in (("power law", fits.params),
                                              ("with offset", fits.params_offset)) if fit]
        paths["loss_vs_params"] = plots.scaling_plot(
            out / "loss_vs_params.png", xs, ys, [sweep.label(j) for j in jobs],
            xlabel=f"parameters ({params_key})", ylabel=metric, fits=laws,
            title=f"{sweep.name}: {metric} vs parameters\n(points: {sweep.label_keys})")
    jobs, xs, ys = numeric_points(sweep.jobs, lambda job: job.metric(COMPUTE), y_of)
    if jobs:
        on_frontier = {id(j) for j in fits.compute_jobs}
        frontier = [i for i, j in enumerate(jobs) if id(j) in on_frontier]
        paths["loss_vs_compute"] = plots.scaling_plot(
            out / "loss_vs_compute.png", xs, ys, [sweep.label(j) for j in jobs],
            xlabel="training compute C (FLOPs)", ylabel=metric, highlight=frontier,
            symbol="C", fits=[("frontier fit", fits.compute)] if fits.compute else [],
            title=f"{sweep.name}: {metric} vs compute\n(points: {sweep.label_keys})")
    size = lambda job: job.metric(params_key) or 0.0
    runs = [(sweep.label(j), j.curves()) for j in sorted(sweep.jobs, key=size)]
    runs = [(label, curves) for label, curves in runs if curves]
    if runs:
        paths["loss_curves"] = plots.curves_plot(
            out / "loss_curves.png", runs, title=f"{sweep.name}: loss curves ({sweep.label_keys})")
    panels = []
    for key in sweep.varying:
        points = [(as_number(j.value(key)), j.metric(metric)) for j in sweep.jobs
                  if j.status == "ok"]
        points = [(x, y) for x, y in points if x is not None and y is not None]
        if len({x for x, _ in points}) >= 2:
            panels.append((key, [x for x, _ in points], [y for _, y in points]))
    if panels:
        paths["loss_vs_overrides"] = plots.overrides_plot(
            out / "loss_vs_overrides.png", panels, ylabel=metric,
            title=f"{sweep.name}: {metric} vs the swept values")
    return paths


def _fit_lines(fits: Fits, params_key: str) -> list[str]:
    lines = []
    if fits.params:
        lines.append(f"- loss vs parameters (`{params_key}`), all ok jobs: "
                     f"`{fits.params.describe('N')}`")
    if fits.params_offset:
        lines.append(f"- the same with an irreducible loss: "
                     f"`{fits.params_offset.describe('N')}`")
    if fits.compute:
        jobs = ", ".join(str(j.num) for j in fits.compute_jobs)
        lines.append(f"- loss vs training FLOPs, compute-efficient frontier (jobs {jobs}): "
                     f"`{fits.compute.describe('C')}`")
    return lines + [f"- {note}" for note in fits.notes]


def _optuna_lines(sweep: Sweep) -> list[str]:
    """The Optuna sweeper's verdict, when it has written one."""
    path = sweep.directory / "optimization_results.yaml"
    if not path.is_file():
        return []
    best = yaml.safe_load(path.read_text()) or {}
    params = " ".join(f"`{k}={v}`" for k, v in (best.get("best_params") or {}).items())
    return [f"Optuna's best trial: {params} with objective {best.get('best_value')} "
            f"(`{path.name}`).", ""]


def build_report(directory: str | Path, out: str | Path | None = None, *,
                 metric: str = "val_loss", params: str = "non_embedding") -> Report:
    """Read the sweep in `directory`, write the report files into `out`, return them."""
    if params not in PARAMS:
        raise ValueError(f"params must be one of {sorted(PARAMS)}, got {params!r}")
    sweep = load_sweep(directory)
    ok = [job for job in sweep.jobs if job.status == "ok"]
    if ok and not any(job.metric(metric) is not None for job in ok):
        names = sorted(k for k, v in ok[0].metrics.items() if as_number(v) is not None)
        raise ValueError(f"metric {metric!r} is in no job's metrics.json; expected one of "
                         f"{', '.join(names)}")
    out = Path(out) if out is not None else sweep.directory / "report"
    out.mkdir(parents=True, exist_ok=True)
    params_key = PARAMS[params]
    fits = fit_scaling(sweep, metric, params_key)

    headers, rows = table(sweep, csv_keys=True)
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(headers)
        writer.writerows(["" if v is None else v for v in row] for row in rows)
    (out / "fits.json").write_text(json.dumps(fits.as_dict(), indent=2, default=str) + "\n")
    paths = {"results.csv": out / "results.csv", "fits.json": out / "fits.json"}
    paths |= _plots(sweep, fits, out, metric, params_key)

    counts = ", ".join(f"{sweep.count(s)} {s}" for s in ("ok", "failed", "incomplete")
                       if sweep.count(s))
    shared = " ".join(f"`{o}`" for o in sweep.shared_overrides) or "none"
    lines = [f"# Sweep `{sweep.name}`", "",
             f"Directory `{sweep.directory}`: {len(sweep.jobs)} jobs ({counts}). "
             f"Shared overrides: {shared}. Metric: `{metric}` (the final validation loss "
             f"unless chosen otherwise).", "",
             _markdown_table(*table(sweep)), "", *_optuna_lines(sweep), "## Scaling fits", "",
             *(_fit_lines(fits, params_key) or ["- no job completed"]), ""]
    failed = [job for job in sweep.jobs if job.status != "ok"]
    if failed:
        lines += ["## Jobs without results", ""]
        lines += [f"- job {job.num} ({job.status}, `{' '.join(job.overrides)}`): "
                  f"{job.error or 'no metrics.json yet'} — `{job.run_dir}`" for job in failed]
        lines.append("")
    figures = {k: v for k, v in paths.items() if v.suffix == ".png"}
    if figures:
        lines += ["## Plots", ""] + [f"![{name}]({p.name})" for name, p in figures.items()]
    markdown = "\n".join(lines) + "\n"
    (out / "report.md").write_text(markdown, encoding="utf-8")
    paths = {"report.md": out / "report.md", **paths}
    return Report(sweep, fits, markdown, paths)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chainrule-report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", nargs="?", help="a multirun directory (default: the "
                        "newest under --root)")
    parser.add_argument("--root", default="multirun", help="where to look for the newest sweep")
    parser.add_argument("--out", help="where to write the report (default: SWEEP_DIR/report)")
    parser.add_argument("--metric", default="val_loss", help="metrics.json key on the y axis "
                        "(val_loss, best_val_loss, val_bits_per_dim, ...)")
    parser.add_argument("--params", default="non_embedding", choices=sorted(PARAMS),
                        help="which parameter count is N")
    args = parser.parse_args(argv)
    try:
        directory = args.sweep_dir or latest_sweep(args.root)
        report = build_report(directory, args.out, metric=args.metric, params=args.params)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.markdown)
    for name, path in report.paths.items():
        print(f"{name:>18}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
