"""Authenticating shared values: an HMAC-SHA256 under a key only the operator holds.

A SHA-256 beside a value catches corruption, not tampering: anyone who can write the shared
Redis could swap the gate or zero the cost scores and recompute it. So every value a worker
reads back from Redis carries `HMAC(key, kind, name, parts...)`. The name is the value's
logical key, so a signed value copied to another key (a low cost score onto a harmful
answer) does not verify either.

The key comes from `--shared-key-file`, `GUARDRAIL_SHARED_KEY_FILE` or `GUARDRAIL_SHARED_KEY`
(in that order). Without one, a worker does not use Redis for shared values at all (it warns
once and keeps to its local folder and memory); a value without a valid tag is ignored.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path

from guardrail.errors import InputError

log = logging.getLogger(__name__)

SHARED_KEY_ENV = "GUARDRAIL_SHARED_KEY"
SHARED_KEY_FILE_ENV = "GUARDRAIL_SHARED_KEY_FILE"
MIN_KEY_BYTES = 16
_warned_no_key = False


class Signer:
    """Tags and checks values under one operator key (HMAC-SHA256, hex)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise InputError(
                f"the shared key has {len(key)} bytes; use at least {MIN_KEY_BYTES} "
                "(for example: openssl rand -hex 32 > shared.key)"
            )
        self._key = key

    def tag(self, kind: str, name: str, *parts: bytes) -> str:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for field in (kind.encode(), name.encode(), *parts):
            mac.update(len(field).to_bytes(8, "big"))  # length-prefixed: no ambiguity
            mac.update(field)
        return mac.hexdigest()

    def verify(self, tag: object, kind: str, name: str, *parts: bytes) -> bool:
        """Whether `tag` (as read back: str, bytes, or anything else) is this value's tag."""
        if isinstance(tag, str):
            tag = tag.encode("utf-8", "replace")
        if not isinstance(tag, bytes):
            return False
        return hmac.compare_digest(tag, self.tag(kind, name, *parts).encode())


def read_key_file(path: str | Path) -> bytes:
    """The key in `path` (surrounding whitespace stripped); a clear error naming the file."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise InputError(f"shared key file {path}: cannot read it: {exc}") from exc
    if len(key) < MIN_KEY_BYTES:
        raise InputError(f"shared key file {path}: {len(key)} bytes, need at least {MIN_KEY_BYTES}")
    return key


def shared_key(key_file: str | Path | None = None) -> bytes | None:
    """The operator's key: `key_file`, else `$GUARDRAIL_SHARED_KEY_FILE`, else
    `$GUARDRAIL_SHARED_KEY`; None when none is set."""
    path = key_file or os.environ.get(SHARED_KEY_FILE_ENV)
    if path:
        return read_key_file(path)
    value = os.environ.get(SHARED_KEY_ENV)
    if not value:
        return None
    key = value.strip().encode()
    if len(key) < MIN_KEY_BYTES:
        raise InputError(f"${SHARED_KEY_ENV}: {len(key)} bytes, need at least {MIN_KEY_BYTES}")
    return key


def signer_for_redis(url: str | None, key: bytes | None = None) -> Signer | None:
    """The signer to use Redis at `url` with (`key`, else the environment's), or None when
    Redis is not to be used: no URL, or no key (warned once per process)."""
    global _warned_no_key
    if not url:
        return None
    key = key if key is not None else shared_key()
    if key is None:
        if not _warned_no_key:
            _warned_no_key = True
            log.warning(
                "Redis at %s is not used for shared artifacts or scores: no shared key "
                "(set --shared-key-file, $%s or $%s); local folder and memory only",
                url,
                SHARED_KEY_FILE_ENV,
                SHARED_KEY_ENV,
            )
        return None
    return Signer(key)


__all__ = [
    "MIN_KEY_BYTES",
    "SHARED_KEY_ENV",
    "SHARED_KEY_FILE_ENV",
    "Signer",
    "read_key_file",
    "shared_key",
    "signer_for_redis",
]
