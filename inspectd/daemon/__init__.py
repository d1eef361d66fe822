"""The runtime: the asyncio app that wires sources and sinks to the scoring engine."""
