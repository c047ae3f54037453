"""Standard Webhooks signatures (https://www.standardwebhooks.com), both ways.

Incoming: with ``QUIESCE_WEBHOOK_SECRET`` set, ``POST /v1/runs`` must carry
``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` headers that sign the
raw body. Outgoing: completion callbacks are signed with ``QUIESCE_CALLBACK_SECRET``.

The signed content is ``"{id}.{timestamp}.{body}"``; the signature is
``v1,<base64 HMAC-SHA256>`` under the secret's key, where a secret is ``whsec_``
followed by the key in base64 (the prefix is optional). Any Standard Webhooks
library on the other side can therefore sign or verify.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from typing import Final

#: A signed request older or newer than this is refused (replayed or skewed).
TOLERANCE_SECONDS: Final = 5 * 60
SECRET_PREFIX: Final = "whsec_"  # noqa: S105 - the format's prefix, not a secret
MIN_KEY_BYTES: Final = 16


class InvalidSignature(ValueError):
    """The request's signature headers are missing, stale or do not match."""


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret; ValueError if it is not one."""
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("expected whsec_ followed by a base64 key") from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the key must be at least {MIN_KEY_BYTES} bytes")
    return key


class WebhookKey:
    def __init__(self, secret: str) -> None:
        self._key = decode_secret(secret)

    @classmethod
    def optional(cls, secret: str | None) -> WebhookKey | None:
        return None if secret is None else cls(secret)

    def sign(self, message_id: str, timestamp: int, body: bytes) -> str:
        signed = f"{message_id}.{timestamp}.".encode() + body
        digest = hmac.new(self._key, signed, hashlib.sha256).digest()
        return "v1," + base64.b64encode(digest).decode()

    def headers(self, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        return {
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": self.sign(message_id, timestamp, body),
        }

    def verify(self, headers: Mapping[str, str], body: bytes, *, now: float) -> str:
        """Check the signature headers of ``body``; return the message id."""
        message_id = headers.get("webhook-id")
        timestamp = headers.get("webhook-timestamp")
        signatures = headers.get("webhook-signature")
        if not message_id or not timestamp or not signatures:
            raise InvalidSignature(
                "missing webhook-id, webhook-timestamp or webhook-signature header"
            )
        try:
            sent_at = int(timestamp)
        except ValueError:
            raise InvalidSignature("webhook-timestamp is not a Unix time in seconds") from None
        if abs(now - sent_at) > TOLERANCE_SECONDS:
            raise InvalidSignature("webhook-timestamp is too far from the current time")
        expected = self.sign(message_id, sent_at, body)
        # Several signatures may be sent (during a key rotation): any may match.
        for candidate in signatures.split():
            if hmac.compare_digest(candidate.encode(), expected.encode()):
                return message_id
        raise InvalidSignature("no signature matches")
