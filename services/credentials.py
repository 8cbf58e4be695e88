"""Credentials, written once: bearer tokens in gRPC metadata, secret files, channel options, TLS.

Two credentials exist. A token (an agent's, or the operator's) proves who calls
the kernel; the cluster secret proves that the caller of a manager is the kernel
(or the tool manager's file tools acting for the agent the kernel named). Both
travel as `authorization: Bearer <secret>` metadata. Secrets live in files of
mode 0600 under a 0700 directory that `aios up` writes; a command line carries
their paths, never their contents (any local user can read /proc/*/cmdline).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Iterable

import grpc

from services.errors import Unauthenticated

AUTHORIZATION = "authorization"
# Prefixes make a leaked secret recognisable (and greppable) for what it is.
AGENT_TOKEN_PREFIX = "aios_agt_"
OPERATOR_TOKEN_PREFIX = "aios_op_"
CLUSTER_SECRET_PREFIX = "aios_cluster_"


Metadata = Iterable[tuple[str, str | bytes]]


def new_secret(prefix: str) -> str:
    """A fresh secret: `prefix` and 256 bits from the OS's CSPRNG."""
    return prefix + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """What is stored instead of a token: its SHA-256 (a 256-bit random token needs no salt or stretching)."""
    return hashlib.sha256(token.encode()).hexdigest()


def same_secret(a: str, b: str) -> bool:
    """Constant-time comparison, so timing does not reveal how much of a guess was right."""
    return hmac.compare_digest(a.encode(), b.encode())


def bearer_metadata(secret: str) -> tuple[tuple[str, str], ...]:
    return ((AUTHORIZATION, f"Bearer {secret}"),)


def bearer_token(metadata: Metadata | None) -> str | None:
    """The token of the call's `authorization: Bearer <token>` entry, or None."""
    for key, value in metadata or ():
        if key != AUTHORIZATION:
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        token = token.strip()
        return token if scheme.lower() == "bearer" and token else None
    return None


# ---- secret files -------------------------------------------------------------------------


def write_secret(path: Path, value: str) -> None:
    """Writes `value` to `path` with mode 0600 (created that way: never readable by others, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    os.chmod(tmp, 0o600)
    tmp.replace(path)


# The deployment files' example secrets contain this: a service refuses to start on one (a publicly known secret).
PLACEHOLDER = "REPLACE-ME"


def read_secret(path: Path) -> str:
    """A secret file's content; refuses an empty file or one that others may read."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"{path} has mode {mode:o}; a secret file must be 0600 (chmod 600 {path})")
    value = path.read_text().strip()
    if not value:
        raise ValueError(f"{path} is empty; it should hold a secret")
    if PLACEHOLDER in value:
        raise ValueError(f"{path} still holds a placeholder ({PLACEHOLDER}...) from deploy/; put a real secret there "
                         "(e.g. `openssl rand -hex 32`)")
    return value


def ensure_secret(path: Path, prefix: str) -> str:
    """The secret in `path`, created on first use (so it survives `aios down` / `aios up`)."""
    if path.exists():
        return read_secret(path)
    value = new_secret(prefix)
    write_secret(path, value)
    return value


# ---- the kernel-only door of the managers ---------------------------------------------


class ClusterSecretCheck:
    """What every manager applies to every call: the caller must show the cluster secret."""

    def __init__(self, secret: str) -> None:
        self._secret = secret

    def __call__(self, metadata: Metadata | None) -> None:
        token = bearer_token(metadata)
        if token is None:
            raise Unauthenticated(
                "this AIOS service accepts calls only from the AIOS kernel (send `authorization: Bearer "
                "<cluster secret>`); agents call the kernel, whose address is in $AIOS_HOME/endpoints.json"
            )
        if not same_secret(token, self._secret):
            raise Unauthenticated("the cluster credential is wrong; only the AIOS kernel may call this service")


# ---- TLS ----------------------------------------------------------------------------------


def tls_server_credentials(cert_file: Path, key_file: Path) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(key_file.read_bytes(), cert_file.read_bytes())])


def certificate_host(cert_pem: bytes) -> str | None:
    """A DNS name the certificate is valid for (its first subjectAltName, else its CN), to check it by."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = names.get_values_for_type(x509.DNSName)
        if dns:
            return dns[0]
    except x509.ExtensionNotFound:
        pass
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(common[0].value) if common else None
