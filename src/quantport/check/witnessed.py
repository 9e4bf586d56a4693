"""What an exporter established about tensor values while it wrote them, so the checker need not read them back.

The value rules of the checker (finite, non-negative scales; finite unquantized floats; the per-tensor scale
values the group and MoE rules compare) read the bytes of many tensors. An export that writes the checkpoint
saw those very bytes on their way to the file (:mod:`quantport.export.value_witness`) and tested them with the
checker's own tests, in batches, while the other shards were still being written. It hands the results to
:func:`~quantport.check.runner.check_checkpoint`:

* ``clean``: tensors whose value test finds nothing (their rule reports nothing for them without a read);
  a tensor whose batch was not clean is absent, and the rule reads and tests it as always, so the findings
  and messages are those of a check without this record;
* ``scalars``: name -> float32 value of one-element tensors, as :func:`~quantport.check.scalars.read_scalars`
  would read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["WitnessedValues"]


@dataclass(frozen=True)
class WitnessedValues:
    """Value facts about a checkpoint's tensors, established from the bytes written (see the module docstring)."""

    clean: frozenset[str] = frozenset()
    scalars: dict[str, float] = field(default_factory=dict)
