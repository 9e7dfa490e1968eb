"""enclavekit: AWS Nitro Enclaves (images, NSM, attestation, runtime, KMS) on any Linux machine."""

import time as _time

__all__ = ["__version__", "LOADED_AT"]

__version__ = "0.1.0"
# when this process first imported the package: a launch server is stale if any of its files is newer
LOADED_AT: float = _time.time()
