"""AIOS Python SDK: `aios.connect()` then `kernel.register(name)`; stubs for any use are in `aios.v1`."""

from aios.client import Agent, Completion, Connection, SyscallError, connect, default_kernel_address, default_token

__all__ = ["Agent", "Completion", "Connection", "SyscallError", "connect", "default_kernel_address", "default_token"]
