"""The Ray process boundary: expert actors, their placement and pool, and how layer calls reach them."""

TRANSPORTS = ("direct", "ray")  # how layer calls travel (actors/transport.py); here so settings import nothing heavy
