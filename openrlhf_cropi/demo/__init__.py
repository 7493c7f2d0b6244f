"""The CPU demo: a synthetic verifiable math suite, a warm-started tiny model, and its report."""
