"""The numba kernels a process has compiled or loaded, for the warm-up tests (they run it in a
fresh subprocess: ``from tests.compiled_kernels import kernel_signatures``)."""

from __future__ import annotations

from numba.core.registry import CPUDispatcher


def kernel_signatures(modules) -> dict[str, set[str]]:
    """{``module.kernel``: its signatures so far} for every numba kernel in ``modules``."""
    return {f"{module.__name__}.{name}": set(map(str, obj.signatures))
            for module in modules for name, obj in vars(module).items()
            if isinstance(obj, CPUDispatcher)}
