"""A seccomp filter for sandboxed code, as a classic BPF program (what `bwrap --seccomp FD` loads).

Refused with EPERM: the system calls that open ways out of a sandbox or into the
kernel's attack surface — new namespaces (unshare, setns, clone with CLONE_NEW*
flags), mounts, ptrace, the keyring, BPF, perf events, userfaultfd, module
loading, kexec, reboot. clone3 answers ENOSYS (its flags are out of a filter's
reach), so libc falls back to clone, whose flags are checked. A call from
another architecture's ABI is refused too (x86_64 only; on other machines the
filter is not built and `isolation()` says so).
"""

from __future__ import annotations

import errno
import platform
import struct

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
# x86_64 system call numbers.
DENIED = {
    "ptrace": 101, "syslog": 103, "pivot_root": 155, "chroot": 161, "mount": 165, "umount2": 166, "swapon": 167,
    "swapoff": 168, "reboot": 169, "init_module": 175, "delete_module": 176, "kexec_load": 246, "add_key": 248,
    "request_key": 249, "keyctl": 250, "unshare": 272, "perf_event_open": 298, "setns": 308,
    "finit_module": 313, "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "open_tree": 428, "move_mount": 429,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
}
CLONE = 56
CLONE3 = 435
CLONE_NEW_FLAGS = 0x7E020000  # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET (and NEWTIME 0x80)
CLONE_NEWTIME = 0x80

# BPF opcodes.
LD_W_ABS, JEQ_K, JSET_K, RET_K = 0x20, 0x15, 0x45, 0x06
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, SECCOMP_RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
# Offsets in struct seccomp_data: nr, arch, instruction_pointer, args[6].
NR, ARCH, ARG0_LOW = 0, 4, 16


def _op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def available() -> bool:
    return platform.machine() == "x86_64"


def filter_program() -> bytes:
    """The filter, ready to write to the file descriptor bwrap reads it from."""
    deny = SECCOMP_RET_ERRNO | errno.EPERM
    program = [
        _op(LD_W_ABS, ARCH),
        _op(JEQ_K, AUDIT_ARCH_X86_64, jt=1),
        _op(RET_K, SECCOMP_RET_KILL_PROCESS),
        _op(LD_W_ABS, NR),
        _op(JSET_K, X32_SYSCALL_BIT, jf=1),  # the x32 ABI: another way around the numbers below
        _op(RET_K, deny),
    ]
    for number in sorted(DENIED.values()):
        program += [_op(JEQ_K, number, jf=1), _op(RET_K, deny)]
    program += [
        _op(JEQ_K, CLONE3, jf=1), _op(RET_K, SECCOMP_RET_ERRNO | errno.ENOSYS),
        _op(JEQ_K, CLONE, jf=3),
        _op(LD_W_ABS, ARG0_LOW),
        _op(JSET_K, CLONE_NEW_FLAGS | CLONE_NEWTIME, jf=1),
        _op(RET_K, deny),
        _op(RET_K, SECCOMP_RET_ALLOW),
    ]
    return b"".join(program)
