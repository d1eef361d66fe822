"""The science: CLIP backbone, prompts, memories and anomaly detectors. No asyncio, no Redis."""
