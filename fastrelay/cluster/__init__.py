"""What lets nodes share the work: signed self-contained tickets
(`signed_tickets`) and their key file (`keyfile`), and the ledger of caps
and spent tickets, local (`ledger`) or in Redis (`redis_ledger`).

May import: `fastrelay.core`. Never `fastrelay.server` or `fastrelay.client`.
"""
