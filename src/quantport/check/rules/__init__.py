"""Rule modules, one per area of the engine contract, run in this order by the checker.

Each module exposes ``check(ctx) -> Iterator[Finding]`` and declares its :class:`~quantport.check.findings.Rule`
objects at import time (so :data:`quantport.check.findings.RULES` lists them all).
"""

from __future__ import annotations

from . import config, engines, exclusions, families, groups, kv, moe, scales, shards, stray, tensors, weights

__all__ = ["CONTENT_RULES", "FILE_RULES", "RULE_MODULES"]

FILE_RULES = (shards, config)
"""Rules about the files themselves; they always run."""
CONTENT_RULES = (exclusions, tensors, groups, scales, moe, families, kv, stray, weights, engines)
"""Rules about the tensors; they run only when every shard is readable and present."""
RULE_MODULES = FILE_RULES + CONTENT_RULES
