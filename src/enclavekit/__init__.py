"""enclavekit: AWS Nitro Enclaves (images, NSM, attestation, runtime, KMS) on any Linux machine."""

__version__ = "0.1.0"
