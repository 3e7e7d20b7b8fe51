"""`chatvec bench`: the I/O floor of the user's own storage and cluster, and a merge measured against it."""
