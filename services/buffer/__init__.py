"""The buffer: stores generated frames in Redis, then publishes them to gateways; serves replays."""
