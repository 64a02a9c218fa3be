"""The asyncio shell: sockets, the loop and time, around the core's rules.

The listener (`listener`: `RelayServer`, `start_server`), one client
connection (`connection`), the data path between two connections
(`transfer`, `kernel_splice`, `flow`), the live relays (`registry`), the one
loop timer (`timer`), TLS contexts (`tls`), and the metrics and log
renderers (`metrics`, `logformat`).

May import: `fastrelay.cluster` and `fastrelay.core`. Never
`fastrelay.client` or the package root.
"""
