"""Execution: one worker function, run by a local (threads) or a Ray (actors) backend."""
