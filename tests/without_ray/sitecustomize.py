"""On PYTHONPATH, makes `ray` absent from a process and its children (as on the lent GPU machines, which have
torch and Triton but no Ray): `import ray` fails and importlib finds no such module."""

import sys

sys.modules["ray"] = None  # type: ignore[assignment]
