"""A fuzz suite: random and hostile inputs to every op, the loaders and the engine (see README)."""
