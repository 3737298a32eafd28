# The app's own Stripe (the simulator it mounts) and an organization buying from it.
from tests.purchasing import shop

__all__ = ["shop"]
