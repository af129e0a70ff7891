"""Development and test tooling: start NATS, Redis and the services locally.

Used by ``make run`` (``python -m devstack``) and by the test fixtures; not
part of the deployed services.
"""
