"""The tokenizer an option names: ``--tokenizer``/``--eod-token`` on the data commands,
``data.tokenizer``/``data.eod_token`` in a run's config; a refusal names the option."""

from __future__ import annotations

from ..config import TOKENIZERS
from .hf_tokenizer import load_hf_tokenizer
from .tokenizer import Tokenizer, TokenizerError, get_tokenizer


def load_tokenizer(
    spec: str, eod_token: str | None = None, *, knob: str = "tokenizer", eod_knob: str = "eod_token"
) -> Tokenizer:
    """A named tokenizer (``gpt2``, ``bytes``) or the path of a local Hugging Face tokenizer.

    ``eod_token`` picks a Hugging Face tokenizer's EOD (``trainer.data.hf_tokenizer``); the named
    ones have their own. ``knob`` and ``eod_knob`` are the options a refusal names.
    """
    if spec in TOKENIZERS:
        if eod_token is not None:
            raise TokenizerError(
                f"{eod_knob}={eod_token!r} applies to a Hugging Face tokenizer; {knob}={spec} has its own EOD"
            )
        return get_tokenizer(spec)
    return load_hf_tokenizer(spec, eod_token, knob=knob, eod_knob=eod_knob)


def add_tokenizer_options(parser, note: str = "") -> None:
    """``--tokenizer NAME|PATH`` and ``--eod-token TOKEN`` on an argparse parser (read back by
    :func:`tokenizer_from_options`); ``note`` ends the ``--tokenizer`` help."""
    parser.add_argument(
        "--tokenizer",
        default="gpt2",
        metavar="NAME|PATH",
        help=f"{', '.join(TOKENIZERS)}, or a local Hugging Face tokenizer.json or tokenizer folder{note} "
        "(default: gpt2)",
    )
    parser.add_argument(
        "--eod-token",
        default=None,
        metavar="TOKEN",
        help="a Hugging Face tokenizer's end-of-document token (default: its eos_token, else <|endoftext|>, else </s>)",
    )


def tokenizer_from_options(args) -> Tokenizer:
    return load_tokenizer(args.tokenizer, args.eod_token, knob="--tokenizer", eod_knob="--eod-token")
