"""The fused merge: a float64 reference and the fast kernels. No I/O in here."""
