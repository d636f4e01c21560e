"""Small adapters both services use, above the kernel: asyncio helpers (`aio`), TLS contexts
(`tls`), Redis credentials and scans (`redis_auth`, `redis_scan`), logging (`logs`) and
loopback port reservations (`ports`). They import the kernel and nothing else of the project.
"""
