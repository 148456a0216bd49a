"""raylens' online endpoint: an OpenAI-compatible Ray Serve application over the shared model layer.

Two deployments (see `serve.app`): `ChatIngress` (FastAPI: auth, validation, image intake, SSE) and
`VLModel` (one engine per replica, sized and autoscaled for it). The split keeps the model replicas'
admission limits for the model alone: a health check, a 401 or a bad image never takes an engine slot,
and when the model is full the ingress answers 503 with an OpenAI-style body at once.
"""
