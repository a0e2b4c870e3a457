"""The offline commands: work on shard sets and finished runs, never inside a training step.

``compare`` (runs side by side), ``study`` (the quality study), ``export`` (weights as a Megatron
blend, JSON or YAML), ``paired`` (paired differences between runs), ``ingest`` (text, parquet, Hugging
Face datasets and Megatron prefixes into a shard set), ``planted`` (the study's shard set). The
runtime (``trainer.loop`` and what it imports) never imports them; ``trainer.cli`` dispatches to them.
"""


def standalone(add_parser, command: str, argv: list[str] | None = None) -> int:
    """``python -m trainer.commands.<module>``: the ``mixtrain <command>`` subcommand that
    ``add_parser`` defines, parsed from ``argv`` (default: the process's arguments) and run."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="mixtrain")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([command, *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
