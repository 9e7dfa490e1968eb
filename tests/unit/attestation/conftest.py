from attestation_helpers import pki

__all__ = ["pki"]
