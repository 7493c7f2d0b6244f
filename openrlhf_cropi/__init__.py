"""openrlhf-cropi: CROPI influence-guided prompt selection for OpenRLHF GRPO."""

__version__ = "0.1.0"
