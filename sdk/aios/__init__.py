"""AIOS Python SDK: `aios.connect()` then `kernel.register(name)`; stubs for any use are in `aios.v1`."""

from aios.client import Agent, Completion, Kernel, SyscallError, connect, default_kernel_address

__all__ = ["Agent", "Completion", "Kernel", "SyscallError", "connect", "default_kernel_address"]
