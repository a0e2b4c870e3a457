"""Benchmark: ``mixtrain data ingest`` throughput with 1 and 2 tokenizing workers.

    python tests/bench/bench_ingest.py [--mb 32] [--rounds 3] [--workers 1,2] [--tokenizers gpt2,bpe]

The corpus is real text that every machine has: the running interpreter's standard library
(``.py`` files, skipping ``site-packages``), cycled until ``--mb`` MB of UTF-8 text, one document
per file, written as four JSON-lines files with a domain field (``tests`` for files under a
``test`` folder, else ``library``) into a temporary folder, so the read, the two-domain spill and
the write are the real ones. Tokenizers: ``gpt2`` (tiktoken) and ``bpe``, a 32k byte-level BPE the
benchmark trains first on 8 MB of the same text (``mixtrain data planted``'s trainer). An untimed ingest
first imports what the first one would (megatron's writer). Every ingest starts its own process
pool (its start-up is part of the time); within each round the worker counts alternate in order
(1, 2, then 2, 1 in the next round), so drift in machine speed hits both alike. Printed per
tokenizer and worker count: the median wall time over the rounds, input MB/s (UTF-8 text bytes),
tokens/s (written tokens, EOD included), the speed-up over one worker, and the median CPU seconds
of the ingest (this process and its workers). A second worker only helps where a core is free:
the last column is how many cores other processes kept busy meanwhile (``/proc/stat``'s busy time
minus the ingest's own CPU time, per second of wall time), so figures from a shared machine can be
read for what they are.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trainer.commands.ingest import ingest  # noqa: E402
from trainer.commands.planted import train_bpe  # noqa: E402
from trainer.data.shardset import ShardSet  # noqa: E402
from trainer.data.tokenizer_options import load_tokenizer  # noqa: E402

FILES = 4
BPE_VOCAB = 32_000
BPE_TRAIN_MB = 8


def stdlib_documents() -> list[tuple[str, str]]:
    """(domain, text) of every stdlib .py file that is UTF-8, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if "site-packages" in parts or "dist-packages" in parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(("tests" if any(p in ("test", "tests") for p in parts) else "library", text))
    return docs


def write_corpus(folder: Path, megabytes: float) -> tuple[list[Path], int, list[str]]:
    """JSON-lines files holding ``megabytes`` MB of text; returns them, the text bytes and a sample for training."""
    docs = stdlib_documents()
    target = int(megabytes * 1e6)
    files = [open(folder / f"part-{i}.jsonl", "w", encoding="utf-8") for i in range(FILES)]
    total, n, sample, sample_bytes = 0, 0, [], 0
    while total < target:
        domain, text = docs[n % len(docs)]
        files[n % FILES].write(json.dumps({"text": text, "domain": domain}) + "\n")
        size = len(text.encode("utf-8"))
        total += size
        if sample_bytes < BPE_TRAIN_MB * 1e6:
            sample.append(text)
            sample_bytes += size
        n += 1
    for f in files:
        f.close()
    return [folder / f"part-{i}.jsonl" for i in range(FILES)], total, sample


def cpu_seconds() -> float:
    """User + system time of this process and of its waited-for children (a finished pool's workers)."""
    return sum(
        r.ru_utime + r.ru_stime
        for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def busy_seconds() -> float:
    """CPU seconds all processes of the machine have spent busy (``/proc/stat``: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--mb", type=float, default=32, help="corpus size in MB of text; the 32k BPE needs 8 or more (default: 32)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default="1,2", help="worker counts, comma-separated (default: 1,2)")
    parser.add_argument("--tokenizers", default="gpt2,bpe", help="gpt2 and/or bpe (default: both)")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        inputs, text_bytes, sample = write_corpus(tmp, args.mb)
        print(
            f"corpus: {text_bytes / 1e6:.1f} MB of stdlib text in {FILES} jsonl files "
            f"({time.perf_counter() - t0:.1f} s)"
        )
        toks = {}
        for name in args.tokenizers.split(","):
            if name == "bpe":
                t0 = time.perf_counter()
                train_bpe(sample, BPE_VOCAB).save(str(tmp / "bpe.json"))
                toks[name] = load_tokenizer(str(tmp / "bpe.json"))
                print(
                    f"bpe: {BPE_VOCAB:,}-id byte-level BPE trained on {BPE_TRAIN_MB} MB "
                    f"in {time.perf_counter() - t0:.1f} s"
                )
            else:
                toks[name] = load_tokenizer(name)
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"cores: {len(os.sched_getaffinity(0))}, rounds: {args.rounds}, load average before: {load}\n")
        warm = tmp / "warm.jsonl"  # untimed: the first ingest of a process imports megatron's writer
        warm.write_text(json.dumps({"text": sample[0], "domain": "library"}) + "\n")
        ingest([warm], tmp / "warm", tokenizer="bytes", quiet=True)

        times: dict[tuple[str, int], list[float]] = {(t, w): [] for t in toks for w in counts}
        cpu: dict[tuple[str, int], list[float]] = {(t, w): [] for t in toks for w in counts}
        others: dict[tuple[str, int], list[float]] = {(t, w): [] for t in toks for w in counts}
        tokens: dict[str, int] = {}
        for r in range(args.rounds):
            order = counts if r % 2 == 0 else counts[::-1]
            for name, tok in toks.items():
                for w in order:
                    out = tmp / f"out-{name}-{w}"
                    t0, c0, b0 = time.perf_counter(), cpu_seconds(), busy_seconds()
                    ingest(inputs, out, tokenizer=tok, workers=w, quiet=True, overwrite=True)
                    times[name, w].append(time.perf_counter() - t0)
                    cpu[name, w].append(cpu_seconds() - c0)
                    others[name, w].append(max(0.0, busy_seconds() - b0 - cpu[name, w][-1]) / times[name, w][-1])
                    splits = [s for d in ShardSet.load(out).domains.values() for s in d.values()]
                    tokens[name] = sum(s.tokens for s in splits)
                    print(
                        f"round {r + 1}: {name:>4} workers={w}: {times[name, w][-1]:6.2f} s, "
                        f"CPU {cpu[name, w][-1]:6.2f} s, other processes {others[name, w][-1]:.2f} cores",
                        flush=True,
                    )

        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"\nload average after: {load}")
        print(
            f"{'tokenizer':>9} {'workers':>7} {'median s':>9} {'MB/s':>7} {'Mtokens/s':>10} {'speed-up':>9} "
            f"{'CPU s':>7} {'others':>7}"
        )
        for name in toks:
            base = statistics.median(times[name, counts[0]])
            for w in counts:
                t = statistics.median(times[name, w])
                print(
                    f"{name:>9} {w:>7} {t:>9.2f} {text_bytes / 1e6 / t:>7.2f} {tokens[name] / 1e6 / t:>10.3f} "
                    f"{base / t:>8.2f}x {statistics.median(cpu[name, w]):>7.2f} "
                    f"{statistics.median(others[name, w]):>7.2f}"
                )
        print(f"\ntokens written: {', '.join(f'{n} {tokens[n]:,}' for n in toks)}")


if __name__ == "__main__":
    main()
