"""Private helpers shared by several enclavekit packages.  Not a public API."""
