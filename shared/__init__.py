"""The project's shared package: wire protocol, subjects and keys, settings, client.

The pure core (``protocol``, ``session``, ``sse``, ``subjects``, ``backoff``)
imports none of asyncio, nats, redis, httpx or starlette.
"""
