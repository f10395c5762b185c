"""LLM appliance: an on-prem, OpenAI-compatible LLM service."""

__version__ = "0.1.0"
