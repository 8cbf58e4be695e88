"""AIOS Python SDK: `aios.connect()` then `kernel.register(name)`; stubs for any use are in `aios.v1`."""

from aios.client import (
    Agent,
    Connection,
    SyscallError,
    connect,
    default_kernel_address,
    default_openai_base_url,
    default_token,
)
from aios.syscalls import Completion

__all__ = ["Agent", "Completion", "Connection", "SyscallError", "connect", "default_kernel_address", "default_openai_base_url",
           "default_token"]
