"""An AWS-compatible KMS that honours Nitro attestation (``Recipient``) and key-policy PCR conditions."""
