"""A sampling profiler for every Python thread of this process (bench use only).

cProfile sees the calling thread only, while quantport's export runs its work on shard, writer and I/O
threads. This samples ``sys._current_frames()`` every ``interval`` seconds and counts, per thread-name
prefix, the innermost frame (self time) and every frame on the stack (inclusive time), so a report says
where each kind of thread spends its wall time, waiting included (a thread blocked in a lock shows the
frame that waits).

    with StackSampler() as sampler:
        work()
    print(sampler.report())
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections import Counter


def _kind(name: str) -> str:
    return re.sub(r"[_-]?\d+(_\d+)?$", "", name)


class StackSampler:
    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.self_counts: Counter[tuple[str, str]] = Counter()
        self.inclusive_counts: Counter[tuple[str, str]] = Counter()
        self.samples: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.is_set():
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                kind = _kind(names.get(ident, "?"))
                self.samples[kind] += 1
                seen: set[str] = set()
                innermost = True
                while frame is not None:
                    code = frame.f_code
                    label = f"{code.co_filename.rsplit('/', 2)[-1]}:{code.co_name}"
                    if innermost:
                        self.self_counts[(kind, f"{label}:{frame.f_lineno}")] += 1
                        innermost = False
                    if label not in seen:
                        seen.add(label)
                        self.inclusive_counts[(kind, label)] += 1
                    frame = frame.f_back
            time.sleep(self.interval)

    def __enter__(self) -> StackSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self, top: int = 25) -> str:
        lines = []
        for kind, total in self.samples.most_common():
            lines.append(f"== thread kind {kind}: {total} samples")
            for title, counts in (("self", self.self_counts), ("inclusive", self.inclusive_counts)):
                rows = sorted(((c, label) for (k, label), c in counts.items() if k == kind), reverse=True)[:top]
                lines.append(f"  -- {title}")
                lines.extend(f"  {100 * c / total:5.1f}%  {label}" for c, label in rows)
        return "\n".join(lines)
