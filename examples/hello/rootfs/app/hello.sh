#!/bin/sh
# The smallest enclave application: say hello on the console, then idle like a service.
echo "hello from inside the enclave"
while true; do sleep 3600; done
