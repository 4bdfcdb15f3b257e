"""The progress bar (rate and ETA) and the peak-memory measure that every stage reports."""

from __future__ import annotations

import resource
import sys
import threading

from tqdm.auto import tqdm


class Bar:
    """A thread-safe progress bar on stderr (disabled: a no-op).

    ``unit`` names what ``update(n)`` counts (events by default; "B" for bytes); ``scale`` prints
    large counts as 1.2M; ``postfix`` shows the latest numbers (loss, metrics) after the rate.
    """

    def __init__(self, desc: str, total: int | None, enabled: bool = True, unit: str = "ev", *, initial: int = 0,
                 scale: bool = True, leave: bool = True) -> None:
        self._lock = threading.Lock()
        self._bar = (
            tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=scale, file=sys.stderr,
                 smoothing=0.05, leave=leave, dynamic_ncols=True)
            if enabled
            else None
        )

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(n)

    def postfix(self, values: dict[str, str]) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def peak_rss_bytes() -> int:
    """Peak resident memory of this process.

    VmHWM of /proc/self/status where there is one: ``ru_maxrss`` also counts the parent's pages
    a forked (or vforked) child held before exec, which overstates a subprocess's own peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
