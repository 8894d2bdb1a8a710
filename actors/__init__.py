"""The Ray process boundary: expert actors, their placement and pool, and how layer calls reach them."""

# Here, not beside their code, so that the CLI and the settings check them without importing Ray.
TRANSPORTS = ("direct", "ray")  # how layer calls travel (actors/transport.py)
EXPERT_DEVICES = ("auto", "cpu", "gpu")  # where expert actors compute (auto: GPUs when the cluster has them)
