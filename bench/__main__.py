"""python -m bench: time kdfast's losses against the code people run today, on this machine.

    python -m bench                    CPU (and CUDA when present), default sizes, < 5 min on 2 cores
    python -m bench --full             the large cases too
    python -m bench --quick            tiny sizes: a smoke test of every path
    python -m bench --only kl --device cpu --json /tmp/kl.json

Writes results.json (or --json PATH), the PNG plots and table.md to bench/results/<machine-tag>/
(or --out DIR), and prints the tables last.
"""
import argparse
import contextlib
import json
import os
import sys
import time

import torch

from bench import divergence, feature, fused_linear, harness, kl, relation, sparse
from bench.memory_probe import MemoryProbe

FAMILIES = {"kl": kl, "divergence": divergence, "sparse": sparse, "relation": relation, "feature": feature,
            "fused_linear": fused_linear}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="add the large cases (minutes more)")
    mode.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    ap.add_argument("--json", metavar="PATH", help="where to write the JSON (default OUT/results.json)")
    ap.add_argument("--out", metavar="DIR", help="folder for JSON, PNGs and table.md "
                                                 "(default bench/results/<machine-tag>)")
    ap.add_argument("--only", choices=sorted(FAMILIES) + ["distributed"], action="append",
                    help="run one loss family (repeatable); distributed: the vocab-parallel losses on 2 gloo "
                         "ranks (bench/distributed.py, on its own)")
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                    help="all = the CPU, and CUDA when torch sees a GPU")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    return ap.parse_args(argv)


def devices_for(choice):
    has_cuda = torch.cuda.is_available()
    if choice == "cuda" and not has_cuda:
        sys.exit("--device cuda: torch sees no CUDA device")
    return {"cpu": ["cpu"], "cuda": ["cuda"], "all": ["cpu"] + (["cuda"] if has_cuda else [])}[choice]


def main(argv=None):
    args = parse_args(argv)
    if args.only and "distributed" in args.only:
        from bench import distributed
        return distributed.main((["--rows", "64", "--vocab", "1000", "--hidden", "16", "--repeats", "1"] if args.quick else [])
                                + (["--json", args.json] if args.json else []))
    t0 = time.perf_counter()
    settings = harness.Settings.for_mode("full" if args.full else "quick" if args.quick else "default")
    if args.no_memory:
        settings = harness.dataclasses.replace(settings, memory=False)
    devices = devices_for(args.device)
    families = [FAMILIES[f] for f in (args.only or FAMILIES)]
    plan = [(fam, case) for dev in devices for fam in families for case in fam.cases(settings, dev)]
    if settings.compile == "first":  # --quick: one torch.compile case exercises that path
        for i, (_, case) in enumerate(plan):
            case.with_compile = i == 0

    info = harness.machine_info(devices)
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                       harness.machine_tag(info))
    os.makedirs(out_dir, exist_ok=True)
    json_path = args.json or os.path.join(out_dir, "results.json")

    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn)
    console = Console(stderr=True, soft_wrap=True)
    console.print(f"kdfast bench ({settings.mode}): {len(plan)} cases on {', '.join(devices)}; "
                  f"{harness.machine_label(info, devices[-1])}")
    probe = MemoryProbe() if settings.memory and "cpu" in devices else None
    history, records = harness.History(), []
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress, contextlib.ExitStack() as stack:
        if probe is not None:
            stack.enter_context(probe)
        task = progress.add_task("", total=len(plan))
        for fam, case in plan:
            head = f"{fam.FAMILY} {case.name} [{case.device}]"

            def on_phase(msg, head=head):
                progress.update(task, description=f"{head}: {msg}")
            on_phase("setting up")
            records += harness.run_case(fam, case, settings, history=history, probe=probe,
                                        on_phase=on_phase)
            progress.advance(task)

    from bench.plots import make_plots
    pngs = make_plots(records, info, os.path.dirname(os.path.abspath(json_path)))
    notes = harness.notes(records)
    tables = harness.format_tables(records, info)
    elapsed = time.perf_counter() - t0
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = list(os.getloadavg())
    doc = harness.to_json(records, info, settings, {"notes": notes, "wall_time_s": elapsed,
                                                    "plots": [os.path.basename(p) for p in pngs]})
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(os.path.dirname(os.path.abspath(json_path)), "table.md"), "w") as f:
        f.write(tables.lstrip() + "\n" + "".join(f"\n- {n}" for n in notes) + "\n")

    print(f"kdfast bench ({settings.mode}) finished in {elapsed:.0f} s on {harness.machine_tag(info)}")
    print(f"JSON: {json_path}")
    for p in pngs:
        print(f"plot: {p}")
    if notes:
        print("\nWhere kdfast is not ahead, or something is off:")
        for n in notes:
            print(f"  - {n}")
    print(tables)


if __name__ == "__main__":
    main()
