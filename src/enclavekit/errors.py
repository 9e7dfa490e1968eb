"""One error root for everything a user can see, with stable codes.

Codes E00–E60 mean exactly what they mean in nitro-cli (same number, same failure, and the process exit status is
the number, as nitro-cli does).  Failures nitro-cli does not have get new codes from E61 upwards, grouped by family.
``enclavekit explain --error-code EXX`` prints the catalogue entry below.

Families follow the cause of the failure:

* :class:`FormatError`: untrusted bytes did not parse (EIF, CBOR, cpio, COSE, attestation documents, archives).
* :class:`VerificationError`: well formed, but not trustworthy (signature, certificate chain, policy).
* :class:`NSMError`: an NSM wire error code (``InvalidIndex``, ``ReadOnlyIndex``, …).
* :class:`ImageError`: building or signing an enclave image failed.
* :class:`ConfigError`: bad arguments or configuration.
* :class:`FileOperationError`: a file could not be read or written.

Caller bugs raise ``TypeError``/``ValueError``/``RuntimeError`` instead.  Messages say what was expected and what
arrived; they never contain key material, plaintext or whole documents.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

__all__ = [
    "ErrorCode",
    "CATALOGUE",
    "lookup",
    "EnclaveKitError",
    "ConfigError",
    "FileOperationError",
    "FormatError",
    "CBORError",
    "EIFFormatError",
    "EIFValidationError",
    "ArchiveError",
    "UnsafeArchiveEntry",
    "ImageError",
    "ImageSourceError",
    "ImagePullError",
    "ImageBuildError",
    "DockerDaemonError",
    "SigningError",
    "SigningCertificateError",
    "SigningKeyError",
    "DetachedSignatureError",
    "EIFSignatureError",
    "VerificationError",
    "NSMError",
    "NSMTransportError",
    "AttestationFormatError",
    "AttestationPolicyError",
    "LocalPKIError",
    "TransportError",
    "VsockTimeout",
    "VsockConnectionRefused",
    "VsockHandshakeError",
    "AllowlistError",
    "EnclaveRuntimeError",
    "AllocatorError",
    "SandboxError",
    "SandboxBootError",
    "CgroupError",
    "SeccompError",
    "AuditError",
    "AuditFormatError",
    "AuditValidationError",
    "AuditHistoryError",
    "AuditDeliveryError",
    "AuditKeyError",
    "AuditSpoolError",
]


class ErrorCode(NamedTuple):
    """A catalogue entry: the stable code, its name, what it means, and what to do about it (immutable).

    A NamedTuple, not a dataclass: every command imports this module, and ``dataclasses`` costs the CLI's start
    ~10 ms (``run-enclave`` is timed by users).
    """

    code: str
    name: str
    meaning: str
    action: str

    @property
    def number(self) -> int:
        return int(self.code[1:])

    @property
    def exit_status(self) -> int:
        # nitro-cli: exit status = the code's number.  Keep it a valid status byte, never 0.
        n = self.number
        return n if 0 < n < 256 else 1


def _entries() -> list[ErrorCode]:
    e = ErrorCode
    return [
        # ---- nitro-cli's codes (aws-nitro-enclaves-cli src/common/mod.rs), same number, same failure ----
        e("E00", "Unspecified", "An error that has no more specific code.",
          "Read the message; run again with BACKTRACE=1 for a traceback and report it if it looks like a bug."),
        e("E01", "MissingArgument", "A required argument was not given.",
          "Give the argument named in the message; see the command's --help."),
        e("E02", "ConflictingArgument", "Two arguments that exclude each other were both given.",
          "Keep only one of the arguments named in the message."),
        e("E03", "InvalidArgument", "An argument has a value that is not allowed.",
          "Correct the value named in the message; see the command's --help for the accepted form."),
        e("E04", "SocketPairCreation", "A socket pair could not be created.", "Check the process's file limits."),
        e("E05", "ProcessSpawn", "A process could not be started.", "Check permissions and resource limits."),
        e("E06", "Daemonize", "The enclave supervisor could not detach.", "Check resource limits and permissions."),
        e("E07", "ReadFromDisk", "The sockets directory could not be read.",
          "Check that the run directory exists and is readable."),
        e("E08", "UnusableConnection", "A connection could not be used.", "Retry; check the peer process."),
        e("E09", "SocketClose", "A socket could not be closed.", "Retry; check the process's file descriptors."),
        e("E10", "SocketConnectTimeout", "Connecting a socket timed out.", "Check that the peer is running."),
        e("E11", "Socket", "A socket operation failed.", "Read the message for the failing operation."),
        e("E12", "Epoll", "Waiting for events failed.", "Retry; check resource limits."),
        e("E13", "Inotify", "Watching a file failed.", "Check inotify limits (fs.inotify.max_user_watches)."),
        e("E14", "InvalidCommand", "The command is not valid here.", "See --help for the available commands."),
        e("E15", "LockAcquire", "A lock could not be taken.", "Retry; another process may hold the lock."),
        e("E16", "ThreadJoin", "A worker thread failed.", "Retry; report it if it repeats."),
        e("E17", "Serde", "Data could not be serialized or parsed (JSON, YAML).",
          "Check the file or value named in the message for syntax errors."),
        e("E18", "FilePermissions", "A file has the wrong permissions.", "Fix the file's mode or owner."),
        e("E19", "FileOperation", "A file could not be opened, read or written.",
          "Check that the file named in the message exists and that you may read (or write) it."),
        e("E20", "InvalidCpuConfiguration", "The CPU configuration is not valid.",
          "Check --cpu-count/--cpu-ids and the allocator's cpu pool."),
        e("E21", "NoSuchCpuAvailableInPool", "A requested CPU is not in the enclave CPU pool.",
          "Request CPUs from the pool configured in allocator.yaml."),
        e("E22", "InsufficientCpus", "Not enough CPUs are free in the pool.",
          "Request fewer CPUs, terminate another enclave, or enlarge the pool."),
        e("E23", "MalformedCpuId", "A CPU id could not be parsed.", "Give CPU ids as non-negative integers."),
        e("E24", "CpuError", "A CPU operation failed.", "Check the CPU configuration."),
        e("E25", "NoSuchHugepageFlag", "No matching huge page size.", "Check the memory configuration."),
        e("E26", "InsufficientMemoryRequested", "The requested memory is less than the enclave image needs.",
          "Request more memory with --memory (at least the amount in the message)."),
        e("E27", "InsufficientMemoryAvailable", "Not enough memory is free in the enclave memory pool.",
          "Request less memory, terminate another enclave, or enlarge memory_mib in allocator.yaml."),
        e("E28", "InvalidEnclaveFd", "The enclave handle is not valid.", "Start the enclave again."),
        e("E29", "Ioctl", "A device operation failed.", "Read the message for the failing operation."),
        e("E30", "IoctlImageLoadInfo", "Image load information could not be read.", "Start the enclave again."),
        e("E31", "IoctlSetMemoryRegion", "A memory region could not be set.", "Start the enclave again."),
        e("E32", "IoctlAddVcpu", "A vCPU could not be added.", "Check the CPU pool."),
        e("E33", "IoctlEnclaveStart", "The enclave could not be started.", "Read the message and the console log."),
        e("E34", "MemoryOverflow", "The image does not fit the enclave memory.", "Request more memory."),
        e("E35", "EifParsing", "The enclave image file (EIF) is malformed.",
          "Rebuild the image; check that the file was copied completely. `describe-eif` shows what is wrong."),
        e("E36", "EnclaveBootFailure", "The enclave did not boot.",
          "Read the console lines in the message and the enclave's console log."),
        e("E37", "EnclaveEventWait", "Waiting for an enclave event failed.", "Retry."),
        e("E38", "EnclaveProcessCommandNotExecuted", "The enclave supervisor did not execute the command.",
          "Retry; check the supervisor's log."),
        e("E39", "EnclaveProcessConnectionFailure", "The enclave supervisor could not be reached.",
          "Check that the enclave is still running (describe-enclaves)."),
        e("E40", "SocketPathNotFound", "The enclave's socket does not exist.",
          "Check the enclave id with describe-enclaves."),
        e("E41", "EnclaveProcessSendReply", "The enclave supervisor could not reply.", "Retry."),
        e("E42", "Mmap", "Memory could not be mapped.", "Check memory limits."),
        e("E43", "Munmap", "Memory could not be unmapped.", "Check memory limits."),
        e("E44", "ConsoleConnection", "The enclave console could not be attached.",
          "Only enclaves started with --debug-mode have a console."),
        e("E45", "ConsoleRead", "The enclave console could not be read.", "Retry."),
        e("E46", "ConsoleWriteOutput", "Console output could not be written.", "Check the terminal or pipe."),
        e("E47", "IntegerParsing", "An integer could not be parsed.", "Give a plain decimal integer."),
        e("E48", "EifBuilding", "The enclave image could not be built.",
          "Read the message; check the blobs, the image source and the output path."),
        e("E49", "DockerImageBuild", "The container image could not be built.", "Check the image source."),
        e("E50", "DockerImagePull", "The container image could not be obtained.",
          "Use a local source: docker-archive:PATH, oci-archive:PATH, oci:DIR or dir:DIR."),
        e("E51", "ArtifactsPathNotSet", "No path for build artifacts.", "Set NITRO_CLI_ARTIFACTS or HOME."),
        e("E52", "BlobsPathNotSet", "No path for the enclave blobs.", "Pass --blobs DIR or set NITRO_CLI_BLOBS."),
        e("E53", "ClockSkew", "The clock is not usable.", "Check the system clock."),
        e("E54", "SignalMasking", "Signals could not be masked.", "Retry."),
        e("E55", "SignalUnmasking", "Signals could not be unmasked.", "Retry."),
        e("E56", "Logger", "The log could not be written.", "Check the log directory."),
        e("E57", "Hasher", "Measuring the image failed.", "Check that the image file is readable."),
        e("E58", "EnclaveNaming", "No single enclave matches the given name.",
          "Use describe-enclaves to find the exact name or use --enclave-id."),
        e("E59", "EIFSignatureChecker", "The image's signature or signing certificate is not valid.",
          "Re-sign the image with a valid certificate (sign-eif) or check the certificate's validity period."),
        e("E60", "EIFSigning", "The image could not be signed.",
          "Check the signing certificate and private key named in the message."),
        # ---- enclavekit's own codes (E61–E69: images and archives) ----
        e("E61", "EifValidation", "The EIF is readable but breaks a rule a strict reader enforces "
          "(the QEMU/hypervisor rules: version, flags, section table, CRC).",
          "Rebuild the image with build-enclave; do not run images that fail strict validation."),
        e("E62", "UnsafeArchiveEntry", "An image layer or archive holds an entry that would escape the root "
          "filesystem (`..`, an absolute path, or a link pointing outside).",
          "Rebuild the container image without such entries; nothing was extracted or written."),
        e("E63", "ImageSource", "The image source could not be read: unknown transport prefix, missing "
          "manifest or config, or a missing command.",
          "Use docker-archive:PATH, oci-archive:PATH, oci:DIR or dir:DIR; for dir: give --cmd."),
        e("E64", "SigningCertificate", "The signing certificate is not a PEM X.509 certificate, or does not "
          "match the private key.", "Give the PEM certificate whose public key matches the private key."),
        e("E65", "SigningKey", "The private key is not a PEM EC key on P-256, P-384 or P-521.",
          "Create one with `openssl ecparam -name secp384r1 -genkey -noout -out key.pem`."),
        e("E66", "DetachedSignature", "A signature made elsewhere does not verify against the exported "
          "payload and the signing certificate.",
          "Sign exactly the bytes written by `sign-eif --export-payload` with the certificate's key."),
        e("E67", "CBORFormat", "Bytes that should be CBOR are malformed (truncated, trailing bytes, duplicate "
          "keys, wrong types).", "The data is corrupt or was not produced by a compatible tool."),
        # ---- E70–E79: attestation and the NSM ----
        e("E70", "AttestationFormat", "The attestation document is not well formed.",
          "Check that the file holds the raw COSE_Sign1 bytes (not base64 or hex)."),
        e("E71", "AttestationVerification", "The attestation document is well formed but not trustworthy: its "
          "signature, certificate chain or a field rule failed (the message names the rule).",
          "Check the trust roots (--root, --aws-root, --local-root) and the time (--at)."),
        e("E72", "AttestationPolicy", "The attestation document is authentic but does not meet the policy "
          "(PCRs, nonce, age, debug mode).", "Compare the document (attestation describe) with the policy."),
        e("E73", "NSMRequest", "The NSM refused a request (its wire error code is in the message).",
          "See the NSM API: e.g. ReadOnlyIndex for locked PCRs, InvalidIndex for indices ≥ 32."),
        e("E74", "NSMTransport", "The NSM could not be reached.",
          "Inside an enclave, check /dev/nsm or the NSM socket; outside one, there is no NSM."),
        e("E75", "LocalPKI", "The local attestation PKI in the state directory is missing or damaged.",
          "Check ENCLAVEKIT_HOME; remove the broken pki/ directory to create a new one."),
        # ---- E76-E79: vsock channels and vsock-proxy ----
        e("E76", "VsockConnectionRefused", "Nobody listens on the vsock address (CID, port), or the address is "
          "not reachable from this side (an enclave reaches only the parent, CID 3).",
          "Start the listener first; check the CID (describe-enclaves) and the port."),
        e("E77", "VsockHandshake", "The peer of an emulated vsock channel broke the CONNECT/OK handshake.",
          "Both ends must be enclavekit's vsock emulation (or speak `CONNECT <port>\\n` / `OK <port>\\n`)."),
        e("E78", "VsockProxyAllowlist", "The vsock-proxy allow-list is missing or malformed, or the destination "
          "is not on it.", "Add `{address: HOST, port: PORT}` under `allowlist:` in the --config file."),
        # ---- E80–E83: the enclave runtime (sandbox, cgroups, seccomp, resource ledger) ----
        e("E80", "EnclaveRuntime", "The enclave sandbox could not be set up (namespaces, mounts, root filesystem).",
          "Run as root on Linux with user, PID, mount and network namespaces enabled; read the message."),
        e("E81", "Cgroup", "A control group for the enclave could not be created, limited, joined or removed.",
          "Check that the memory, pids and cpuset controllers are available to this process (cgroup v1 or v2; on "
          "v2 the process's own cgroup must be delegated)."),
        e("E82", "Seccomp", "The enclave's system-call filter could not be built or installed.",
          "Check that the kernel supports seccomp filters (CONFIG_SECCOMP_FILTER) for this architecture."),
        e("E83", "ResourceLedger", "The enclave resource ledger (allocations.json in the state directory) is "
          "damaged.", "Terminate all enclaves, then remove allocations.json from the state directory."),
        # ---- E84–E89: the KMS ----
        e("E84", "KMSRequest", "The KMS answered with an AWS error (its exception name is in the message).",
          "Read the exception name: AccessDeniedException names the policy statement and condition that decided."),
        e("E85", "CMSFormat", "A CiphertextForRecipient (CMS EnvelopedData) is malformed or does not open "
          "with the key.",
          "Check that the envelope was made for this enclave's RSA key (a fresh key per request)."),
        e("E86", "KMSCiphertext", "A KMS ciphertext blob is malformed, truncated or was altered.",
          "Use the CiphertextBlob exactly as Encrypt returned it, with the same encryption context."),
        e("E87", "KeyPolicy", "A key policy document is not valid IAM policy JSON.",
          "Check Version, Statement, Effect, Principal, Action, Resource and Condition; see docs/kms.md."),
        e("E88", "KMSStore", "The KMS key store (SQLite data directory or PostgreSQL database) or its root key "
          "could not be used.", "Check --data-dir / --database-url and the root key (root.key or "
          "ENCLAVEKIT_KMS_ROOT_KEY)."),
        # ---- E90–E99: the audit trail (CloudTrail-format log files, signed digests, delivery, validation) ----
        e("E90", "AuditTrail", "The audit trail could not be opened or written (state directory, spool, lock).",
          "Check that the trail's state directory exists, is writable and is not on a full disk."),
        e("E91", "AuditFormat", "A trail log file, digest file or record is malformed (gzip, JSON, key name).",
          "The file is corrupt or was not written by a CloudTrail-compatible trail; run `audit validate`."),
        e("E92", "AuditValidation", "The trail failed validation: a file was modified, deleted, inserted, "
          "moved or not covered by a digest, or the digest chain is broken.",
          "Read the report lines marked INVALID; restore the files from a protected copy (Object Lock)."),
        e("E93", "AuditHistory", "The trail refused to overwrite an existing log or digest file.",
          "Someone else writes under the same prefix, or the trail's state was reset; use a new prefix."),
        e("E94", "AuditDelivery", "The trail's object store could not be reached or refused a request.",
          "Check --endpoint-url, the bucket and the credentials; events stay in the spool meanwhile."),
        e("E95", "AuditKey", "The trail's signing key is missing, unreadable, has loose permissions, or a "
          "public key given for validation is not an RSA key.",
          "Keep the trail's keys/ directory mode 0700 and the key 0600; give a PEM RSA public key."),
        e("E96", "AuditSpool", "The trail's local spool or delivery state is damaged.",
          "Do not edit the spool; restore the state directory from a backup or start a new trail."),
    ]


CATALOGUE: dict[str, ErrorCode] = {entry.code: entry for entry in _entries()}


def lookup(code: str) -> ErrorCode | None:
    """The catalogue entry for ``code`` (``E35`` or ``35``), or None."""
    code = code.strip().upper()
    if code.isdigit():
        code = f"E{int(code):02d}"
    return CATALOGUE.get(code)


class EnclaveKitError(Exception):
    """Root of every error enclavekit reports to a user.

    Subclasses set ``code``; an instance may override it (``code="E22"``) for nitro-cli codes that share a family.
    ``hint`` is an optional extra sentence on what to do; ``details`` are short key/value diagnostics.
    """

    code: ClassVar[str] = "E00"

    def __init__(self, message: str, *, code: str | None = None, hint: str | None = None,
                 details: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            if code not in CATALOGUE:
                raise ValueError(f"unknown error code {code}")
            self.code = code  # type: ignore[misc]
        self.hint = hint
        self.details = dict(details or {})

    @property
    def entry(self) -> ErrorCode:
        return CATALOGUE[self.code]

    @property
    def exit_status(self) -> int:
        return self.entry.exit_status

    def diagnostics(self) -> str:
        """The text a person reads: ``[ EXX ] message`` plus details and what to do."""
        lines = [f"[ {self.code} ] {self.message}"]
        for key, value in self.details.items():
            lines.append(f"  {key}: {value}")
        lines.append(f"  hint: {self.hint or self.entry.action}")
        lines.append(f"  (enclavekit explain --error-code {self.code})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.message


class _WithRule(EnclaveKitError):
    """An error that names the rule (the check) that failed: ``rule``."""

    def __init__(self, message: str, *, rule: str, code: str | None = None, hint: str | None = None,
                 details: dict[str, str] | None = None) -> None:
        super().__init__(message, code=code, hint=hint, details=details)
        self.rule = rule


class ConfigError(EnclaveKitError):
    code = "E03"


class FileOperationError(EnclaveKitError):
    code = "E19"


class FormatError(EnclaveKitError):
    """Untrusted bytes did not parse."""

    code = "E35"


class CBORError(FormatError):
    code = "E67"


class EIFFormatError(FormatError):
    code = "E35"


class EIFValidationError(_WithRule, FormatError):
    """A strict-mode rule failed; ``rule`` names it."""

    code = "E61"


class ArchiveError(FormatError):
    code = "E63"


class UnsafeArchiveEntry(ArchiveError):
    code = "E62"


class ImageError(EnclaveKitError):
    code = "E48"


class ImageSourceError(ImageError):
    code = "E63"


class ImagePullError(ImageSourceError):
    """A bare image name: enclavekit has no Docker daemon or registry client to pull it."""

    code = "E50"


class ImageBuildError(ImageError):
    code = "E48"


class DockerDaemonError(ImageError):
    """An option that needs a Docker daemon (``--docker-dir``): enclavekit has none."""

    code = "E49"


class SigningError(ImageError):
    code = "E60"


class SigningCertificateError(SigningError):
    code = "E64"


class SigningKeyError(SigningError):
    code = "E65"


class DetachedSignatureError(SigningError):
    """A signature made elsewhere (``sign-eif --signature``) does not verify."""

    code = "E66"


class VerificationError(_WithRule, EnclaveKitError):
    """Well formed, but not trustworthy.  ``rule`` names the rule that failed."""

    code = "E71"


class EIFSignatureError(VerificationError):
    """nitro-cli's EIFSignatureChecker failure: the EIF's signature or certificate is not valid; ``rule`` names
    the check that failed."""

    code = "E59"


class NSMError(EnclaveKitError):
    """An NSM wire error; ``error_code`` is the wire name (``InvalidIndex``, …)."""

    code = "E73"

    def __init__(self, error_code: str, message: str | None = None, **kwargs: object) -> None:
        super().__init__(message or f"NSM returned {error_code}", **kwargs)  # type: ignore[arg-type]
        self.error_code = error_code


class NSMTransportError(EnclaveKitError):
    """The NSM could not be reached (no /dev/nsm, no NSM socket, a broken or timed-out connection)."""

    code = "E74"


class AttestationFormatError(FormatError):
    """An attestation document did not parse or breaks a field rule of its format; ``rule`` names the rule."""

    code = "E70"

    def __init__(self, message: str, *, rule: str = "format", **kwargs: object) -> None:
        details = dict(kwargs.pop("details", None) or {})  # type: ignore[call-overload]
        details.setdefault("rule", rule)
        super().__init__(message, details=details, **kwargs)  # type: ignore[arg-type]
        self.rule = rule


class AttestationPolicyError(VerificationError):
    """An authentic attestation document that does not meet the caller's policy; ``rule`` names the check."""

    code = "E72"


class LocalPKIError(EnclaveKitError):
    """The local attestation PKI in the state directory is missing or damaged."""

    code = "E75"


class TransportError(EnclaveKitError):
    """A vsock channel (emulated or real) failed: socket errors, refusals, timeouts, handshakes."""

    code = "E11"


class VsockTimeout(TransportError):
    code = "E10"


class VsockConnectionRefused(TransportError):
    code = "E76"


class VsockHandshakeError(_WithRule, TransportError):
    """The CONNECT/OK handshake of an emulated channel failed; ``rule`` names what was wrong."""

    code = "E77"


class AllowlistError(_WithRule, ConfigError):
    """The vsock-proxy allow-list is malformed, or the destination is not on it; ``rule`` names the check."""

    code = "E78"


class EnclaveRuntimeError(EnclaveKitError):
    """The enclave runtime failed: sandbox set-up, cgroups, seccomp, resources."""

    code = "E80"


class AllocatorError(EnclaveRuntimeError):
    """A resource request cannot be met; carries nitro-cli's code (E20–E27) or E83 for a damaged ledger."""

    code = "E83"


class SandboxError(EnclaveRuntimeError):
    code = "E80"


class SandboxBootError(SandboxError):
    """The sandboxed application did not start (nitro-cli's EnclaveBootFailure)."""

    code = "E36"


class CgroupError(EnclaveRuntimeError):
    code = "E81"


class SeccompError(EnclaveRuntimeError):
    code = "E82"


class AuditError(EnclaveKitError):
    """The audit trail (log files, digests, spool, delivery) failed."""

    code = "E90"


class AuditFormatError(AuditError):
    """A trail log file, digest file, record or key name did not parse."""

    code = "E91"


class AuditValidationError(AuditError):
    """Validation of a trail found a failure; ``rule`` names the check and ``location`` the file."""

    code = "E92"

    def __init__(self, message: str, *, rule: str, location: str = "", details: dict[str, str] | None = None) -> None:
        super().__init__(message, details=details)
        self.rule = rule
        self.location = location


class AuditHistoryError(AuditError):
    """The trail refused to overwrite an object that already exists."""

    code = "E93"


class AuditDeliveryError(AuditError):
    """The object store could not be reached or refused a request; ``transient`` ones are retried."""

    code = "E94"

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class AuditKeyError(AuditError):
    code = "E95"


class AuditSpoolError(AuditError):
    code = "E96"
