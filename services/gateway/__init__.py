"""The gateway: client WebSockets, SSE and HTTP in front of the NATS services."""
