"""`cammsr recommend`: the top-K next items of a finished run for a history of items, with their titles."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _ids(value: str) -> list[str]:
    ids = [part.strip() for part in value.split(",") if part.strip()]
    if not ids:
        raise argparse.ArgumentTypeError("expected comma-separated item ids, oldest first")
    return ids


def _times(value: str) -> list[float]:
    try:
        return [float(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated Unix times in seconds, got {value!r}") from None


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def add_recommend_command(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "recommend", help="top-K next items of a trained run for a history of item ids, with titles",
        description="Load a run written by `cammsr train` (its config.yaml, the dataset it names, a checkpoint) in "
                    "one process and rank every item after the given history as evaluation ranks it. "
                    "Prints the history and the top K items with original ids, scores and titles.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run", dest="run_dir", required=True, type=Path,
                        help="run directory (the --run-dir of `cammsr train`)")
    parser.add_argument("--history", required=True, type=_ids, metavar="ID,ID,...",
                        help="item ids in chronological order (oldest first): the dataset's original ids (ASIN, "
                             "movie id, ...) unless --internal-ids; only the last model.max_seq_len are read")
    parser.add_argument("--internal-ids", action="store_true", help="--history holds internal ids 1..N")
    parser.add_argument("--times", type=_times, metavar="T,T,...",
                        help="the interaction time of each --history item (Unix seconds): needed by time-aware "
                             "models (HM4SR), not read by the others")
    parser.add_argument("--k", type=_positive, default=10, help="how many items to recommend")
    parser.add_argument("--include-history", action="store_true",
                        help="keep items of the history among the recommendations (excluded by default)")
    parser.add_argument("--checkpoint", default="best",
                        help="best (the best validation round), latest, or a checkpoint tag (ep0003-st0000000)")
    parser.add_argument("--data", type=Path, help="the prepared dataset, when it moved since training "
                                                  "(default: data.path of RUN/config.yaml)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(run=run_recommend)
    return parser


def run_recommend(args) -> dict:
    from train.recommend import Catalogue, RunRecommender  # heavy imports only for this command
    recommender = RunRecommender(args.run_dir, args.checkpoint, args.data)
    catalogue = Catalogue.read(recommender.data, recommender.extra_items)
    history = catalogue.resolve(args.history, internal=args.internal_ids)
    used = min(len(history), recommender.max_len)
    if used < len(history) and args.json:  # the table says so itself
        print(f"note: the history has {len(history)} items; the model reads the last {used} "
              f"(model.max_seq_len={recommender.max_len})", file=sys.stderr)
    exclude = set() if args.include_history else set(history)
    ranked = recommender.top_k(history, args.k, exclude, args.times)
    if len(ranked) < args.k:
        print(f"note: only {len(ranked)} items are left to recommend", file=sys.stderr)

    def item(number: int) -> dict:
        original, title = catalogue.describe(number)
        return {"item_id": original, "internal_id": number, "title": title}

    state = recommender.state
    result = {
        "run": str(args.run_dir), "model": recommender.cfg.model.name, "checkpoint": recommender.tag,
        "epochs_trained": state["epoch"], "history": [dict(item(n), used=i >= len(history) - used)
                                                      for i, n in enumerate(history)],
        "history_items_excluded": not args.include_history,
        "recommendations": [dict(item(n), rank=r, score=s) for r, (n, s) in enumerate(ranked, 1)],
    }
    print(json.dumps(result, indent=1) if args.json else _table(result, used, len(history)))
    return result


def _table(result: dict, used: int, given: int) -> str:
    width = max(len("item id"), *(len(r["item_id"]) for r in result["history"] + result["recommendations"]))
    lines = [f"{result['model']} run {result['run']}, checkpoint {result['checkpoint']} "
             f"(after {result['epochs_trained']} epochs)", "",
             f"history ({given} items, oldest first" + (f"; the model reads the last {used}" if used < given else "")
             + "):", f"{'#':>4}  {'item id':<{width}}  title"]
    for number, entry in enumerate(result["history"], 1):
        lines.append(f"{number if entry['used'] else '-':>4}  {entry['item_id']:<{width}}  {entry['title']}")
    lines += ["", f"top {len(result['recommendations'])}"
              + (" (history items excluded)" if result["history_items_excluded"] else "") + ":",
              f"{'rank':>4}  {'item id':<{width}}  {'score':>9}  title"]
    for entry in result["recommendations"]:
        lines.append(f"{entry['rank']:>4}  {entry['item_id']:<{width}}  {entry['score']:>9.4f}  {entry['title']}")
    return "\n".join(lines)
