"""Training loops and losses for methods that learn something (adapters, prompts, FFN heads)."""
