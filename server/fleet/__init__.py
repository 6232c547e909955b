"""Many replicas of the server behind one endpoint. Ray Serve's integration (ray_serve) is optional: only
`routing` and `asgi` are imported without Ray installed."""
