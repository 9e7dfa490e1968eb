"""Attestation throughput against raw P-384 ECDSA with the same library, in one run on one core.

* documents issued per second (DocumentIssuer.issue: payload encoding + ES384 signature, leaf cached) vs. raw
  P-384 signatures per second (cryptography, SHA-384, a message of a document's size); target ratio >= 0.5;
* documents verified per second (verify() with the chain cache warm: parse + pinned root + validity + policy +
  one signature) vs. raw P-384 verifications per second; target ratio >= 0.5.

Run: ``.venv/bin/python benchmarks/attestation.py [--seconds 2]``.  Prints the figures and both ratios.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from enclavekit.attestation.issuer import DocumentIssuer
from enclavekit.attestation.pki import LocalPKI
from enclavekit.attestation.verifier import ChainCache, TrustRoot, verify


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds`` (after a short warm-up)."""
    for _ in range(20):
        fn()
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(50):
            fn()
        n += 50
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        print(f"pinned to CPU {cpu}")

    now = datetime.now(UTC)
    ms = int(now.timestamp() * 1000)
    with tempfile.TemporaryDirectory() as home:
        pki = LocalPKI.open(Path(home), now=now)
        issuer = DocumentIssuer(pki)
        module_id = "i-0123456789abcdef0-enc0199546b533fd5d0"
        pcrs = {i: os.urandom(48) for i in range(16)}
        nonce = os.urandom(32)
        document = issuer.issue(module_id=module_id, timestamp_ms=ms, pcrs=pcrs, public_key=None, user_data=None,
                                nonce=nonce)
        roots = [TrustRoot(pki.root.der)]
        cache = ChainCache()
        verify(document, roots, now, cache=cache)

        key = ec.generate_private_key(ec.SECP384R1())
        message = os.urandom(len(document))
        signature = key.sign(message, ec.ECDSA(hashes.SHA384()))
        public = key.public_key()

        raw_sign = rate(lambda: key.sign(message, ec.ECDSA(hashes.SHA384())), args.seconds)
        issue = rate(lambda: issuer.issue(module_id=module_id, timestamp_ms=ms, pcrs=pcrs, public_key=None,
                                          user_data=None, nonce=nonce), args.seconds)
        raw_verify = rate(lambda: public.verify(signature, message, ec.ECDSA(hashes.SHA384())), args.seconds)
        verified = rate(lambda: verify(document, roots, now, cache=cache), args.seconds)

    print(f"document size                 {len(document)} bytes")
    print(f"raw P-384 signatures/s        {raw_sign:10.0f}")
    print(f"documents issued/s            {issue:10.0f}")
    print(f"raw P-384 verifications/s     {raw_verify:10.0f}")
    print(f"documents verified/s (cached) {verified:10.0f}")
    print(f"issue ratio   {issue / raw_sign:.2f}  (target >= 0.5)")
    print(f"verify ratio  {verified / raw_verify:.2f}  (target >= 0.5)")


if __name__ == "__main__":
    main()
