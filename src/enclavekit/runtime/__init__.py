"""The enclave runtime: the resource allocator, cgroups, the seccomp filter and the namespace sandbox.

Import from the modules themselves (``enclavekit.runtime.allocator``, ``.cgroups``, ``.seccomp``, ``.sandbox``).
This package imports nothing on purpose: the sandbox's launcher (``_sandbox_init``) starts a fresh interpreter
for every enclave, and its start-up time is the sandbox's start-up time.
"""

from __future__ import annotations

__all__: list[str] = []
