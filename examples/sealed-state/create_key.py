"""Runs on the PARENT: create the sealed-state key, whose policy releases plaintext only to one image's PCR0.

    python examples/sealed-state/create_key.py --credentials creds.json --pcr0 PCR0 \
        [--endpoint http://127.0.0.1:4600] [--region us-east-1]

``creds.json`` is the output of ``enclavekit kms create-credentials``.  The policy
(``enclavekit.quickstart.enclave_key_policy``) lets those credentials do everything except kms:Decrypt and
kms:ReEncrypt*, and allows kms:Decrypt only with an attestation document whose PCR0 is ``--pcr0``: the parent can
create data keys for the enclave but can neither decrypt them nor re-encrypt them to a key of its own.  Prints the
key id on stdout, the policy on stderr.
"""

import argparse
import json
import sys
from pathlib import Path

import boto3

from enclavekit.quickstart import enclave_key_policy

parser = argparse.ArgumentParser()
parser.add_argument("--credentials", type=Path, required=True, help="output of `enclavekit kms create-credentials`")
parser.add_argument("--pcr0", required=True, help="the image's PCR0 (build-enclave's Measurements.PCR0)")
parser.add_argument("--endpoint", default="http://127.0.0.1:4600")
parser.add_argument("--region", default="us-east-1")
args = parser.parse_args()

creds = json.loads(args.credentials.read_text())
policy = enclave_key_policy(creds["Arn"], args.pcr0)
kms = boto3.client("kms", endpoint_url=args.endpoint, region_name=args.region,
                   aws_access_key_id=creds["AccessKeyId"], aws_secret_access_key=creds["SecretAccessKey"])
key_id = kms.create_key(Policy=json.dumps(policy), Description="sealed-state example")["KeyMetadata"]["KeyId"]
print(json.dumps(policy, indent=2), file=sys.stderr)
print(key_id)
