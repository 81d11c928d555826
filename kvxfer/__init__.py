"""kvxfer: disaggregated KV-cache transfer over NIXL.

Layers, each importing only those above it (see DESIGN.md): `layouts` (cache geometry),
`planning` (TP mapping, span pairing), `agents` (NIXL, side channel, peers, leases), `attention`,
`engine` (reference model), `daemons` and `cli`, `integrations.vllm`.
"""

__version__ = "0.1.0"
