"""The emulated Nitro Secure Module: a pure state machine answering NSM API requests.

It holds 32 SHA-384 PCRs (a :class:`PCRBank`), applies the boot measurements of an enclave image and the parent
instance's identity, then answers requests exactly as the NSM does (spec nsm-attestation-kms §2.5):

* PCRs 0-15 are locked at boot; extend is ``SHA384(old || data)``; locking rules and error codes of §2.5;
* ``user_data``, ``nonce`` and ``public_key`` are at most 1024 bytes each, a request at most 4096 bytes;
* ``GetRandom`` returns 256 bytes; ``DescribeNSM`` reports 32 PCRs, the locked set, ``SHA384``;
* an attestation document carries all currently locked PCRs; in debug mode PCR0/1/2/8 read as zeros in the
  document (PCR3/4 stay real).

Nothing here does I/O: randomness (``random_source``), the clock (``clock_ms``) and document signing
(``signer``, a :class:`DocumentSigner`) are injected.  :meth:`EmulatedNSM.handle` takes request bytes and returns
response bytes and never raises for bad input: it answers ``{"Error": ...}`` as the NSM would.  One request is
processed at a time (a lock), as the driver's mutex does (§1.1).
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Mapping
from typing import Protocol

from enclavekit.errors import EnclaveKitError, NSMError
from enclavekit.formats import nsm_messages as msg
from enclavekit.formats.nsm_messages import NSMErrorCode

__all__ = [
    "DocumentSigner",
    "PCRBank",
    "EmulatedNSM",
    "BOOT_LOCKED_PCRS",
    "DEBUG_ZEROED_PCRS",
    "RANDOM_SIZE",
    "extend_digest",
    "parent_role_pcr",
    "parent_instance_pcr",
    "make_module_id",
    "DEFAULT_INSTANCE_ID",
    "instance_id_of",
]

ZERO_PCR = bytes(msg.PCR_SIZE)
# §2.5 boot state: PCRs 0-15 are reserved for the platform and locked.
BOOT_LOCKED_PCRS = 16
# §2.5 debug mode / eif-pcr-cli §2.5: the image measurements read as zeros in the document, PCR3/4 stay real.
DEBUG_ZEROED_PCRS = frozenset({0, 1, 2, 8})
# §2.3: QEMU returns exactly 256 bytes; the SDK asks for "up to 256".
RANDOM_SIZE = 256
# Boot measurements that come from the image (eif-pcr-cli §2.2); PCR3/4 come from the parent identity.
_IMAGE_PCRS = frozenset({0, 1, 2, 8})


class DocumentSigner(Protocol):
    """Signs an attestation document (the local PKI's issuer implements this).

    Returns the complete COSE_Sign1 bytes of the document (spec §3).  ``pcrs`` holds every PCR to include,
    already adjusted for debug mode.
    """

    def issue(self, *, module_id: str, timestamp_ms: int, pcrs: Mapping[int, bytes], public_key: bytes | None,
              user_data: bytes | None, nonce: bytes | None) -> bytes: ...


def extend_digest(old: bytes, data: bytes) -> bytes:
    """One PCR extend (§2.5): ``SHA384(old || data)``; ``data`` is raw, not pre-hashed."""
    return hashlib.sha384(old + data).digest()


def parent_role_pcr(role_arn: str | None) -> bytes:
    """PCR3 (eif-pcr-cli §2.3): ``SHA384(0^48 || utf8(role ARN))``, all zeros when no role is attached."""
    if role_arn is None:
        return ZERO_PCR
    return extend_digest(ZERO_PCR, role_arn.encode("utf-8"))


def parent_instance_pcr(instance_id: str | None) -> bytes:
    """PCR4 (eif-pcr-cli §2.3): ``SHA384(0^48 || utf8(instance id))``, all zeros when none is configured."""
    if instance_id is None:
        return ZERO_PCR
    return extend_digest(ZERO_PCR, instance_id.encode("utf-8"))


_INSTANCE_ID = re.compile(r"i-[0-9a-f]{8,17}")
_MODULE_ID_INSTANCE = re.compile(r"(i-[0-9a-f]{8,17})-enc[0-9a-f]+")
# the instance id of a module whose parent is not configured (module id and PCR4 agree on it)
DEFAULT_INSTANCE_ID = "i-00000000000000000"


def instance_id_of(module_id: str) -> str | None:
    """The parent instance id inside an enclave id ``i-…-enc…`` (§3.5), or None for other module ids."""
    match = _MODULE_ID_INSTANCE.fullmatch(module_id)
    return match.group(1) if match else None


def make_module_id(instance_id: str, creation_ms: int, rand16: int) -> str:
    """An enclave id / ``module_id`` as Nitro forms it (§3.5): ``<instance id>-enc<12 hex ms><4 hex>``.

    ``creation_ms`` is the creation time in milliseconds since the epoch; ``rand16`` a random 16-bit value.
    """
    if not _INSTANCE_ID.fullmatch(instance_id):
        raise ValueError(f"instance id must look like i-0123456789abcdef0, got {instance_id!r}")
    if not isinstance(creation_ms, int) or not 0 <= creation_ms < 16**12:
        raise ValueError("creation_ms must be a non-negative integer below 16**12")
    if not isinstance(rand16, int) or not 0 <= rand16 <= 0xFFFF:
        raise ValueError("rand16 must be in 0..65535")
    return f"{instance_id}-enc{creation_ms:012x}{rand16:04x}"


class PCRBank:
    """32 SHA-384 PCRs and their lock bits (§2.5).  Rule violations raise :class:`NSMError`."""

    def __init__(self, count: int = msg.MAX_PCRS) -> None:
        self._values = [ZERO_PCR] * count
        self._locked = [False] * count

    def __len__(self) -> int:
        return len(self._values)

    def _check_index(self, index: int) -> None:
        # §2.5: index >= 32 -> InvalidIndex
        if not 0 <= index < len(self._values):
            raise NSMError(NSMErrorCode.INVALID_INDEX.value, f"PCR index {index} is out of range 0..{len(self) - 1}")

    def read(self, index: int) -> tuple[bytes, bool]:
        """(value, locked) of PCR ``index``."""
        self._check_index(index)
        return self._values[index], self._locked[index]

    def set_boot_value(self, index: int, value: bytes) -> None:
        """Write a boot measurement directly (before the platform locks the bank)."""
        self._check_index(index)
        if len(value) != msg.PCR_SIZE:
            raise ValueError(f"PCR{index} must be {msg.PCR_SIZE} bytes, got {len(value)}")
        if self._locked[index]:
            raise RuntimeError(f"PCR{index} is already locked")
        self._values[index] = bytes(value)

    def extend(self, index: int, data: bytes) -> bytes:
        """Extend PCR ``index`` with ``data`` and return the new value."""
        self._check_index(index)
        # §2.5: ExtendPCR on a locked index -> ReadOnlyIndex
        if self._locked[index]:
            raise NSMError(NSMErrorCode.READ_ONLY_INDEX.value, f"PCR{index} is locked")
        self._values[index] = extend_digest(self._values[index], data)
        return self._values[index]

    def lock(self, index: int) -> None:
        """Lock one PCR; locking an already locked PCR (0-15 included) is ``ReadOnlyIndex`` (§2.5, QEMU)."""
        self._check_index(index)
        if self._locked[index]:
            raise NSMError(NSMErrorCode.READ_ONLY_INDEX.value, f"PCR{index} is already locked")
        self._locked[index] = True

    def lock_range(self, count: int) -> None:
        """Lock ``[0, count)``; already locked PCRs are fine; ``count`` > 32 is ``InvalidIndex`` (§2.5)."""
        if not 0 <= count <= len(self._values):
            raise NSMError(NSMErrorCode.INVALID_INDEX.value,
                           f"LockPCRs range {count} is larger than the {len(self)} PCRs")
        for index in range(count):
            self._locked[index] = True

    def locked(self) -> tuple[int, ...]:
        """Locked indices, ascending."""
        return tuple(i for i, locked in enumerate(self._locked) if locked)

    def values(self) -> tuple[bytes, ...]:
        return tuple(self._values)


def _pcr_index(key: object) -> int | None:
    """``0``, ``"0"``, ``"PCR0"``, ``"pcr0"`` -> 0; ``HashAlgorithm`` (describe-eif output) -> None."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str):
        if key == "HashAlgorithm":
            return None
        text = key[3:] if key.lower().startswith("pcr") else key
        if text.isdigit():
            return int(text)
    raise ValueError(f"measurement key {key!r} is not a PCR index (0, 'PCR0', ...)")


def _pcr_value(index: int, value: object) -> bytes:
    if isinstance(value, str):
        try:
            value = bytes.fromhex(value)
        except ValueError:
            raise ValueError(f"PCR{index} is not hex") from None
    if not isinstance(value, bytes) or len(value) != msg.PCR_SIZE:
        raise ValueError(f"PCR{index} must be {msg.PCR_SIZE} bytes (or {2 * msg.PCR_SIZE} hex digits)")
    return value


class EmulatedNSM:
    """One enclave's NSM.

    ``measurements`` are the image's PCRs as ``describe-eif`` prints them (``{"PCR0": hex, "PCR1": ..., "PCR2":
    ..., "PCR8": ...}``; int keys and bytes values work too); PCR8 is present only for signed images.
    ``parent_role_arn`` / ``parent_instance_id`` give PCR3 / PCR4.  ``module_id`` defaults to an enclave id made
    from the instance id, the clock and two random bytes (§3.5).  PCR4 is never zero on Nitro (§2.5): without
    ``parent_instance_id`` it measures the instance id the module id names (``i-…-enc…``), else
    :data:`DEFAULT_INSTANCE_ID`, the one a default module id is made from.
    """

    def __init__(
        self,
        *,
        signer: DocumentSigner,
        random_source: Callable[[int], bytes],
        clock_ms: Callable[[], int],
        module_id: str | None = None,
        measurements: Mapping[int | str, bytes | str] | None = None,
        parent_role_arn: str | None = None,
        parent_instance_id: str | None = None,
        debug_mode: bool = False,
        version: tuple[int, int, int] = (1, 0, 0),
    ) -> None:
        if len(version) != 3 or not all(isinstance(v, int) and 0 <= v <= 0xFFFF for v in version):
            raise ValueError("version must be three integers in 0..65535")
        self._signer = signer
        self._random = random_source
        self._clock_ms = clock_ms
        self._debug_mode = bool(debug_mode)
        self._version = version
        self._lock = threading.RLock()
        self._bank = PCRBank()
        # §2.5 boot measurements: each is one extend of a zero PCR, computed by whoever measured the image
        for key, value in (measurements or {}).items():
            index = _pcr_index(key)
            if index is None:
                continue
            if index not in _IMAGE_PCRS:
                raise ValueError(f"image measurements hold PCR0, 1, 2 and 8 only, got PCR{index}")
            self._bank.set_boot_value(index, _pcr_value(index, value))
        if module_id is None:
            rand = random_source(2)
            if len(rand) != 2:
                raise ValueError("random_source returned the wrong number of bytes")
            module_id = make_module_id(parent_instance_id or DEFAULT_INSTANCE_ID, clock_ms(),
                                       int.from_bytes(rand, "big"))
        self._module_id = module_id
        # §2.5: PCR4 is never zero on Nitro; without a configured parent it measures the instance id the
        # module id carries, so the document's module_id and PCR4 tell the same story
        instance_id = parent_instance_id or instance_id_of(module_id) or DEFAULT_INSTANCE_ID
        # eif-pcr-cli §2.3: PCR3/PCR4 extend with the raw strings; PCR3 stays zero without a role
        self._bank.set_boot_value(3, parent_role_pcr(parent_role_arn))
        self._bank.set_boot_value(4, parent_instance_pcr(instance_id))
        # §2.5: then the platform locks 0-15
        self._bank.lock_range(BOOT_LOCKED_PCRS)

    # ------------------------------------------------------------------------------------------- properties

    @property
    def module_id(self) -> str:
        return self._module_id

    @property
    def debug_mode(self) -> bool:
        return self._debug_mode

    def pcrs(self) -> dict[int, bytes]:
        """All 32 PCR values (a snapshot; what the NSM holds, not what a debug-mode document shows)."""
        with self._lock:
            return dict(enumerate(self._bank.values()))

    # ---------------------------------------------------------------------------------------- typed methods

    def describe_pcr(self, index: int) -> msg.DescribePCRResponse:
        with self._lock:
            value, locked = self._bank.read(index)
            return msg.DescribePCRResponse(lock=locked, data=value)

    def extend_pcr(self, index: int, data: bytes) -> msg.ExtendPCRResponse:
        with self._lock:
            return msg.ExtendPCRResponse(data=self._bank.extend(index, data))

    def lock_pcr(self, index: int) -> msg.LockPCRResponse:
        with self._lock:
            self._bank.lock(index)
            return msg.LockPCRResponse()

    def lock_pcrs(self, range_: int) -> msg.LockPCRsResponse:
        with self._lock:
            self._bank.lock_range(range_)
            return msg.LockPCRsResponse()

    def describe_nsm(self) -> msg.DescribeNSMResponse:
        with self._lock:
            major, minor, patch = self._version
            return msg.DescribeNSMResponse(
                version_major=major, version_minor=minor, version_patch=patch, module_id=self._module_id,
                max_pcrs=msg.MAX_PCRS, locked_pcrs=self._bank.locked(), digest=msg.Digest.SHA384,
            )

    def attestation(self, *, user_data: bytes | None = None, nonce: bytes | None = None,
                    public_key: bytes | None = None) -> msg.AttestationResponse:
        # §2.5: each input at most 1024 bytes (InputTooLarge above, an assumption); public_key is not validated
        for name, value in (("user_data", user_data), ("nonce", nonce), ("public_key", public_key)):
            if value is not None and len(value) > msg.INPUT_MAX_SIZE:
                raise NSMError(NSMErrorCode.INPUT_TOO_LARGE.value,
                               f"{name} is {len(value)} bytes, the limit is {msg.INPUT_MAX_SIZE}")
        with self._lock:
            values = self._bank.values()
            # §2.5: the document holds all currently locked PCRs; debug mode zeroes the image PCRs
            pcrs = {
                i: ZERO_PCR if self._debug_mode and i in DEBUG_ZEROED_PCRS else values[i]
                for i in self._bank.locked()
            }
            document = self._signer.issue(module_id=self._module_id, timestamp_ms=self._clock_ms(), pcrs=pcrs,
                                          public_key=public_key, user_data=user_data, nonce=nonce)
            return msg.AttestationResponse(document=document)

    def get_random(self) -> msg.GetRandomResponse:
        with self._lock:
            data = self._random(RANDOM_SIZE)
        if len(data) != RANDOM_SIZE:
            raise ValueError(f"random_source returned {len(data)} bytes, expected {RANDOM_SIZE}")
        return msg.GetRandomResponse(random=data)

    # ------------------------------------------------------------------------------------------ wire entry

    def handle_request(self, request: msg.Request) -> msg.Response:
        """Answer a parsed request; NSM rule violations become :class:`ErrorResponse`."""
        try:
            return self._dispatch(request)
        except NSMError as exc:
            return msg.ErrorResponse(NSMErrorCode(exc.error_code))
        except EnclaveKitError:
            # the signer failed (e.g. a damaged local PKI): the NSM reports an internal error
            return msg.ErrorResponse(NSMErrorCode.INTERNAL_ERROR)

    def handle(self, request: bytes) -> bytes:
        """Answer request bytes with response bytes; never raises for bad input (§2.5)."""
        try:
            parsed = msg.decode_request(request)
        except msg.NSMRequestTooLarge:
            # §2.5: a request over 4096 bytes -> InputTooLarge
            return msg.ErrorResponse(NSMErrorCode.INPUT_TOO_LARGE).to_bytes()
        except msg.NSMMessageError:
            # §2.5: an unparseable or unknown request -> InvalidOperation (QEMU)
            return msg.ErrorResponse(NSMErrorCode.INVALID_OPERATION).to_bytes()
        response = self.handle_request(parsed).to_bytes()
        if len(response) > msg.RESPONSE_MAX_SIZE:
            # §1.1: the driver's buffer is 0x3000 bytes; a longer answer would arrive truncated
            return msg.ErrorResponse(NSMErrorCode.INTERNAL_ERROR).to_bytes()
        return response

    def _dispatch(self, request: msg.Request) -> msg.Response:
        if isinstance(request, msg.DescribePCRRequest):
            return self.describe_pcr(request.index)
        if isinstance(request, msg.ExtendPCRRequest):
            return self.extend_pcr(request.index, request.data)
        if isinstance(request, msg.LockPCRRequest):
            return self.lock_pcr(request.index)
        if isinstance(request, msg.LockPCRsRequest):
            return self.lock_pcrs(request.range)
        if isinstance(request, msg.DescribeNSMRequest):
            return self.describe_nsm()
        if isinstance(request, msg.AttestationRequest):
            return self.attestation(user_data=request.user_data, nonce=request.nonce,
                                    public_key=request.public_key)
        if isinstance(request, msg.GetRandomRequest):
            return self.get_random()
        raise TypeError(f"not an NSM request: {type(request).__name__}")
