"""Re-exports :mod:`watcher.kernel.sys.abi`, the one home of these kernel ABI facts.

Kept only so code written against the old path keeps importing while parallel
work lands; import from :mod:`watcher.kernel.sys.abi` instead.
"""

from __future__ import annotations

from watcher.kernel.sys.abi import KERNEL_NAME_MAX, percpu_slot

__all__ = ["KERNEL_NAME_MAX", "percpu_slot"]
