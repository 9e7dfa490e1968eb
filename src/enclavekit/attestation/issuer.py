"""Issue attestation documents signed by the local PKI, byte for byte in AWS's envelope (spec §3.1 to §3.3).

The emulated NSM calls :meth:`DocumentIssuer.issue` for every ``Attestation`` request.  The result is an untagged
COSE_Sign1: ``84 44 a1013822 a0 59 LLLL <payload> 58 60 <r || s>``, signed ES384 with the leaf key of the
module id.  One leaf serves a module id until it expires (3 h), then a new one is issued (spec 3.4).

The time of a document is the ``timestamp_ms`` the caller passes; nothing here reads the clock.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from enclavekit._internal.ecdsa import sign_raw
from enclavekit.attestation.pki import LeafCertificate, LocalPKI
from enclavekit.formats import cbor
from enclavekit.formats.attestation_doc import MAX_TIMESTAMP, PROTECTED_ES384, AttestationDocument

__all__ = ["DocumentIssuer", "ES384"]

ES384 = -35
# attestation doc 3.3: Sig_structure = ["Signature1", protected, h'', payload]; its fixed prefix
_SIG_PREFIX = b"\x84" + cbor.encode("Signature1") + cbor.encode(PROTECTED_ES384) + b"\x40"
# attestation doc 3.1: array(4), protected bstr(4) {1: -35}, empty unprotected map
_ENVELOPE_PREFIX = b"\x84" + cbor.encode(PROTECTED_ES384) + b"\xa0"


class DocumentIssuer:
    """Signs attestation documents with the local PKI's leaf for each module id.

    ``definite_map=True`` writes the payload map with the pre-2025 ``a9`` head instead of ``bf … ff``.
    Thread-safe: one issuer may serve several NSM connections.
    """

    def __init__(self, pki: LocalPKI, *, definite_map: bool = False, max_cached_leaves: int = 256) -> None:
        self.pki = pki
        self.definite_map = definite_map
        self._max_cached = max_cached_leaves
        self._leaves: dict[str, LeafCertificate] = {}
        self._lock = threading.Lock()

    def leaf_for(self, module_id: str, when: datetime) -> LeafCertificate:
        """The cached leaf of ``module_id`` if still valid at ``when``, else a newly issued one."""
        with self._lock:
            leaf = self._leaves.get(module_id)
            if leaf is not None and leaf.usable_at(when):
                return leaf
            leaf = self.pki.issue_leaf(module_id, when)
            if len(self._leaves) >= self._max_cached:
                # drop expired leaves first, then the oldest entry
                for key in [k for k, v in self._leaves.items() if not v.usable_at(when)] or [
                        next(iter(self._leaves))]:
                    del self._leaves[key]
            self._leaves[module_id] = leaf
            return leaf

    def issue(self, *, module_id: str, timestamp_ms: int, pcrs: Mapping[int, bytes], public_key: bytes | None,
              user_data: bytes | None, nonce: bytes | None) -> bytes:
        """Build, sign and encode one document; returns the COSE_Sign1 bytes (untagged, as AWS).

        Out-of-range inputs (a PCR of the wrong size, more than 1024 bytes of user_data, …) are ValueError: the
        NSM checks its limits before calling.  An empty ``public_key`` is written as null.
        """
        if (not isinstance(timestamp_ms, int) or isinstance(timestamp_ms, bool)
                or not 0 < timestamp_ms <= MAX_TIMESTAMP):
            raise ValueError(f"timestamp_ms must be an integer in 1..{MAX_TIMESTAMP}")
        if public_key == b"":
            # spec 3.6: a public_key is 1..1024 bytes, so h'' could never verify; an empty key means "none"
            public_key = None
        when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=timestamp_ms)
        leaf = self.leaf_for(module_id, when)
        document = AttestationDocument(
            module_id=module_id, timestamp=timestamp_ms, pcrs=pcrs, certificate=leaf.der,
            cabundle=leaf.chain.cabundle, public_key=public_key, user_data=user_data, nonce=nonce,
            indefinite_map=not self.definite_map,
        )
        payload = document.to_payload_bytes()
        payload_bstr = cbor.encode_head(2, len(payload)) + payload
        signature = sign_raw(leaf.key, ES384, _SIG_PREFIX + payload_bstr)
        return _ENVELOPE_PREFIX + payload_bstr + cbor.encode_head(2, len(signature)) + signature
