"""The offline commands: work on shard sets and finished runs, never inside a training step.

``compare`` (runs side by side), ``study`` (the quality study), ``export`` (weights as a Megatron
blend, JSON or YAML), ``paired`` (paired differences between runs), ``ingest`` (text, parquet, Hugging
Face datasets and Megatron prefixes into a shard set), ``planted`` (the study's shard set). The
runtime (``trainer.loop`` and what it imports) never imports them; ``trainer.cli`` dispatches to them.
"""
