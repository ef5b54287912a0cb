"""The lossy-regime benchmark (issue 15) on the bundled DiT with a stated GPU-like costs table.

Stages (each writes into --out, results are re-used when present):
  table           exhaustive per-sample tables by prefix-cached tree walks (T=10 fp32/int4, T=8 fp32/int8/int4)
  pipeline-table  the same through a text-to-image pipeline, for one seed and a range of a prompts file: a long walk
                  split into pieces that fit a session and run side by side (one core each), merged by `report`
  matched         T=20, all levels, real evaluations: TMPDiff vs uniform/heuristics/evolutionary, judged on unseen seeds
  report          bench_lossy.json, bench_lossy.md and plots from the tables and matched.json
  compact         --tables merged into one table with float32 metrics and no features (--out/--name), to commit
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from tmpdiff.formats.atomic import write_json


def _groups(text: str) -> list[list[int]]:
    return [[int(s) for s in g.split(",")] for g in text.split("/") if g]


def provenance_path(table: Path) -> Path:
    """Beside a table: what made the engines it walked (`build_provenance`), `<table stem>.provenance.json`."""
    return table.with_name(f"{table.stem}.provenance.json")


def write_provenance(session, levels: list[str], table: Path) -> None:
    from tmpdiff.calibration.provenance import build_provenance

    write_json(provenance_path(table), build_provenance(session.build_dir, session.manifest, levels))


def stage_table(args, steps: int, levels: list[str], group: list[int], path: Path) -> None:
    from tmpdiff.calibration.exhaustive import build_table, save_table, tree_steps
    from tmpdiff.calibration.session import open_session
    from tmpdiff.models.bundled import bundled_dir

    session = open_session(args.build, args.costs, steps, seeds=group, threads=1, reference=args.reference)
    ev = session.evaluator
    bar = tqdm(total=tree_steps(len(levels), steps), desc=path.name, mininterval=10)
    table = build_table(ev.runner, ev.sampling, list(ev.classes), [group], levels, args.reference, steps,
                        str(bundled_dir() / "classifier"), bar.update)
    save_table(table, path)
    write_provenance(session, levels, path)
    session.evaluator.runner.close()


def stage_pipeline_table(args, path: Path) -> None:
    """Walk every schedule through the pipeline for prompts [first, first + count) of --prompts and one seed. A
    sample's label is its prompt's class: --label-offset (the file's first class) plus its line in the file."""
    from tmpdiff.calibration.exhaustive import save_table
    from tmpdiff.calibration.pipeline_exhaustive import build_pipeline_table
    from tmpdiff.calibration.pipeline_session import open_pipeline_session
    from tmpdiff.runtime.capture import read_prompts

    prompts = read_prompts(args.prompts)
    chunk = prompts[args.first:args.first + args.count] if args.count else prompts[args.first:]
    if not chunk:
        raise SystemExit(f"{args.prompts}: no prompts from line {args.first + 1} ({len(prompts)} in the file)")
    session = open_pipeline_session(args.build, args.costs, args.pipeline, chunk, [args.seed], args.steps,
                                    reference=args.reference, threads=1)
    try:
        table = build_pipeline_table(session, [(chunk, [args.seed])], args.levels.split(","))
    finally:
        session.evaluator.close()
    table.labels = [args.label_offset + args.first + i for i in table.labels]
    save_table(table, path)
    write_provenance(session, table.levels, path)


def stage_compact(tables: list[Path], path: Path) -> None:
    import numpy as np

    from tmpdiff.calibration.exhaustive import load_table, merge_tables, save_table

    for kept in (path, provenance_path(path)):
        if kept.exists():
            raise SystemExit(f"{kept} exists: choose another --name or remove it")
    missing = [str(t) for t in tables if not t.is_file()]
    if missing:
        raise SystemExit(f"no such table: {', '.join(missing)}")
    merged = merge_tables([load_table(t) for t in tables])
    merged.features = None  # classifier features (for a Frechet distance): the report does not read a table's
    save_table(merged, path, metrics_dtype=np.float32)
    # each walk's engines, where recorded (walks before 2026-12-07 did not record them)
    write_json(provenance_path(path), {t.name: json.loads(provenance_path(t).read_text()) if provenance_path(t).is_file()
                                       else None for t in tables})


def stage_matched(args) -> None:
    from _code_version import code_version  # a search kept from other code is not re-used

    from tmpdiff.calibration.matched import judge_unseen, search_matched
    from tmpdiff.calibration.provenance import build_provenance
    from tmpdiff.calibration.session import open_session
    from tmpdiff.formats.costs import load_costs
    from tmpdiff.models.bundled import bundled_dir

    calib_seeds, unseen_groups = _groups(args.matched_calib)[0], _groups(args.matched_unseen)
    odd = [g for g in unseen_groups if len(g) != len(calib_seeds)]
    if odd:  # the runner's batch is the calibration set's: refuse before an hour of search, not after it
        raise SystemExit(f"--matched-unseen groups {odd} differ in size from --matched-calib ({len(calib_seeds)} "
                         "seeds): give groups of as many seeds, separated by '/'")
    session = open_session(args.build, args.costs, args.matched_steps, args.metric, args.reference,
                           seeds=calib_seeds, threads=1)
    cost = session.problem.cost
    targets = {f"uniform {p} cost": cost[args.reference] / cost[p] for p in session.problem.levels[:-1]}
    targets |= {f"{s:g}x": s for s in args.matched_speedups}
    # the search is the long part: kept on its own, and re-used by a re-run with the same settings
    searched = args.out / "matched_search.json"
    settings = {"calib_seeds": calib_seeds, "steps": args.matched_steps, "metric": args.metric,
                "targets": targets, "refine_evaluations": args.refine_evaluations,
                "costs_table": load_costs(args.costs).provenance(), "build": str(args.build), "code": code_version()}
    kept = json.loads(searched.read_text()) if searched.is_file() else {}
    if kept.get("settings") == settings:
        found = kept["found"]
        print(f"search re-used from {searched}", flush=True)
    else:
        found = search_matched(session, targets, args.metric, on_progress=lambda m: print(m, flush=True),
                               refine_evaluations=args.refine_evaluations)
        found["calibration_evaluations"] = session.evaluator.runs
        write_json(searched, {"settings": settings, "found": found})
    schedules = {tuple([p] * args.matched_steps) for p in session.problem.all_levels}
    schedules |= {tuple(m["schedule"]) for t in found["targets"] for m in t["methods"].values()}
    judged = judge_unseen(session, sorted(schedules), unseen_groups, str(bundled_dir() / "classifier"))
    import numpy as np

    np.savez_compressed(args.out / "matched_samples.npz",
                        **{f"{' '.join(s)}|{k}": v for s, m in judged.items() for k, v in m.items()})
    made = build_provenance(args.build, session.manifest, session.problem.all_levels)
    write_json(args.out / "matched.json", found | {"costs_table": settings["costs_table"], "calib_seeds": calib_seeds,
                                                   "build_provenance": made,
                                                   "unseen_seeds": [s for g in unseen_groups for s in g],
                                                   "steps": args.matched_steps, "per_step_cost": cost})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["table", "pipeline-table", "matched", "report", "compact"])
    parser.add_argument("--build", type=Path, help="table, pipeline-table, matched: the build directory")
    parser.add_argument("--costs", type=Path, help="table, pipeline-table, matched: the costs table")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tables", type=Path, nargs="*", default=[], help="compact: the tables to merge")
    parser.add_argument("--name", help="compact: file name of the merged table in --out")
    parser.add_argument("--reference", default="fp32")
    parser.add_argument("--metric", default="latent")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--levels", default="fp32,int4")
    parser.add_argument("--group", default="0,1", help="seeds of one table walk")
    parser.add_argument("--pipeline", type=Path, help="pipeline-table: the diffusers pipeline the build belongs to")
    parser.add_argument("--prompts", type=Path, help="pipeline-table: prompts file, one per line")
    parser.add_argument("--first", type=int, default=0, help="pipeline-table: first prompt (0-based line)")
    parser.add_argument("--count", type=int, default=0, help="pipeline-table: prompts walked (0: to the end)")
    parser.add_argument("--label-offset", type=int, default=0,
                        help="pipeline-table: class of the file's first prompt (0 for calibration prompts, their count "
                             "for unseen ones)")
    parser.add_argument("--seed", type=int, default=0, help="pipeline-table: the noise seed of the walk")
    parser.add_argument("--matched-steps", type=int, default=20)
    parser.add_argument("--matched-calib", default="0")
    parser.add_argument("--matched-unseen", default="100/101/102/103")
    parser.add_argument("--matched-speedups", type=float, nargs="*", default=[])
    parser.add_argument("--refine-evaluations", type=int, default=None,
                        help="matched stage: at most this many refinement evaluations per target (default: up to 3*T*L)")
    args = parser.parse_args()
    if args.stage in ("table", "pipeline-table", "matched") and (args.build is None or args.costs is None):
        parser.error(f"{args.stage} needs --build and --costs")
    if args.stage == "compact" and (not args.tables or not args.name):
        parser.error("compact needs --tables and --name")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage == "table":
        name = f"table_T{args.steps}_{args.levels.replace(',', '-')}_s{args.group.replace(',', '-')}.npz"
        stage_table(args, args.steps, args.levels.split(","), [int(s) for s in args.group.split(",")], args.out / name)
    elif args.stage == "pipeline-table":
        if args.pipeline is None or args.prompts is None:
            parser.error("pipeline-table needs --pipeline and --prompts")
        end = "end" if not args.count else args.first + args.count
        name = (f"table_T{args.steps}_{args.levels.replace(',', '-')}_{args.prompts.stem}_p{args.first}-{end}"
                f"_s{args.seed}.npz")
        stage_pipeline_table(args, args.out / name)
    elif args.stage == "matched":
        stage_matched(args)
    elif args.stage == "compact":
        stage_compact(args.tables, args.out / args.name)
    else:
        from tmpdiff.calibration.lossy_report import write_report

        write_report(args.out, json.loads((args.out / "config.json").read_text()) if (args.out / "config.json").exists()
                     else {})


if __name__ == "__main__":
    main()
