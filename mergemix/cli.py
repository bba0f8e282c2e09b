"""`mergemix` command line: each subcommand is a thin call of the public Python API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from mergemix.errors import MergemixError

log = logging.getLogger("mergemix")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mergemix", description="Propose a mid-training data mixture by merging "
                                "per-domain experts (MergeMix).")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and the result only")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("propose", "train experts, search mixtures, write proposal.json"),
                        ("evaluate", "score the base and every expert on every benchmark metric"),
                        ("validate", "check a recipe and print it with every default filled in"),
                        ("experts", "train (or reuse) experts only, e.g. one domain per job; propose then reuses them"),
                        ("search", "only the search, over the experts a propose run trained; --worker adds trials "
                                   "to a shared study"),
                        ("report", "train real models on a few mixtures and show how well the merged proxy ranks "
                                   "them: report/index.html, report.md, consistency.json")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("recipe", help="recipe YAML file")
        s.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="dotted overrides, e.g. experts.steps=50 search.seeds=20 data.domains.code.max_chars=1000000")
        if name in ("propose", "report", "search"):
            s.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
        if name == "experts":
            s.add_argument("--domain", action="append", metavar="NAME",
                           help="train only this domain's expert (repeatable; default: every domain)")
        if name == "search":
            from mergemix.catalog import STRATEGIES

            s.add_argument("--strategy", choices=["auto", *STRATEGIES],
                           help="search strategy (default: search.strategy)")
            s.add_argument("--worker", action="store_true",
                           help="add trials to the shared optuna study and exit, writing no proposal.json")
        if name == "evaluate":
            s.add_argument("--stability", action="store_true",
                           help="also score the path base → expert (t = 0, .25, .5, .75, 1) and print Kendall tau "
                           "of every metric along it; writes stability.json")
    sub.add_parser("ls", help="list every name a recipe can choose: merge methods, benchmark kinds and their "
                   "metrics, surrogates, built-in corpora")
    e = sub.add_parser("export", help="write the merge at one alpha as a Hugging Face directory, with the "
                       "mergekit YAML of the same merge; or the proposed mixture for a trainer (--format)")
    e.add_argument("run", help="run directory, or the recipe YAML file of the run")
    e.add_argument("--format", default="model", choices=["model", "megatron", "json", "yaml"],
                   help="model: the merged model (default); megatron: Megatron-LM's --data-path weights and "
                   "prefixes; json, yaml: per-domain weights, tokens and epochs (written beside proposal.json)")
    e.add_argument("--alpha", default="proposal", help='proposal (alpha* of proposal.json), best (the best-scoring '
                   'trial) or a mixture such as "code=0.4,prose=0.6" (default proposal); with experts.replay the '
                   'merge weights differ from the mixture, and mergemix.json and the mergekit YAML hold them')
    e.add_argument("--out", help="output directory (default RUN/export/LABEL-HASH)")
    return p


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    from mergemix.progress import set_quiet

    set_quiet(quiet)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("accelerate", "datasets", "transformers", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # KEY=VALUE overrides may also follow the flags
    if any("=" not in e or e.startswith("-") for e in extra) or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    _configure_logging(args.verbose, args.quiet)
    try:
        if args.command == "ls":
            from mergemix.catalog import catalog

            print(catalog())
            return 0
        if args.command == "export" and args.format != "model":
            from mergemix.pipelines.mixtures import write_mixture

            print(f"wrote {write_mixture(args.run, args.format)}")
            return 0
        if args.command == "export":
            from mergemix.pipelines.export import export

            done = export(args.run, args.alpha, args.out)
            print(f"wrote {done.path} (alpha {', '.join(f'{d}={a:g}' for d, a in done.alpha.items())})")
            return 0
        from mergemix.recipe import dump_recipe, load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        if args.command == "validate":
            print(dump_recipe(recipe), end="")
            print(f"# {args.recipe}: valid", file=sys.stderr)
            return 0
        from mergemix.hostmem import pin_mmap_threshold

        pin_mmap_threshold()  # training and merging free large buffers: give them back to the system
        start = time.perf_counter()
        if args.command == "report":
            from mergemix.report import rank_consistency

            result = rank_consistency(recipe)
            if result is None:  # another process of a multi-process launch: the main one reports
                return 0
            print(json.dumps(result.data, indent=2, sort_keys=True) if args.json else f"\n{result.summary()}")
            print(f"\nwrote {recipe.resolved_run_dir() / 'report' / 'index.html'} in {time.perf_counter() - start:.0f} s",
                  file=sys.stderr if args.json else sys.stdout)
            return 0
        if args.command == "evaluate":
            from mergemix.pipelines.evaluate import STEPS, evaluate_paths

            report = evaluate_paths(recipe, STEPS if args.stability else (0.0, 1.0))
            print()
            print(report.scores_table())
            if args.stability:
                print()
                print(report.table())
            print(f"\nwrote {recipe.resolved_run_dir() / 'stability.json'} in {time.perf_counter() - start:.0f} s")
            return 0
        if args.command == "experts":
            from mergemix.collective import is_main_process
            from mergemix.pipelines.experts import train_experts_only

            experts = train_experts_only(recipe, args.domain)
            if is_main_process():
                for e in experts:
                    print(f"expert {e.domain}: {e.path}")
            return 0
        if args.command == "search" and args.worker:
            from mergemix.pipelines.search import search_worker

            result = search_worker(recipe, args.strategy)
            print(f"the study holds {len(result.trials)} scored mixtures (references included); the best so far "
                  f"scores {result.star.objective:.3f} at {json.dumps(result.star.alpha)}")
            return 0
        if args.command == "search":
            from mergemix.pipelines.search import search_again

            proposal = search_again(recipe, args.strategy).proposal
        else:
            from mergemix.pipelines.propose import propose

            proposal = propose(recipe)
            if proposal is None:  # another process of a multi-process launch: the main one reports
                return 0
        if args.json:
            print(json.dumps(proposal.model_dump(mode="json"), indent=2, sort_keys=True))
        else:
            print()
            print("Benchmark signal (base and experts):")
            print(proposal.signal_table())
            print()
            print(proposal.table())
            print(f"\nwrote {recipe.resolved_run_dir() / 'proposal.json'} in {time.perf_counter() - start:.0f} s")
        return 0
    except MergemixError as e:
        _close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_progress_bars()
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _close_progress_bars() -> None:
    """Clear bars a failed stage left on the terminal, so the message starts its own line."""
    from tqdm import tqdm

    for bar in list(tqdm._instances):  # tqdm's registry of live bars
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
