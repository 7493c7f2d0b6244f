"""Reward functions in OpenRLHF's contract (`--reward.remote_url FILE.py`)."""
