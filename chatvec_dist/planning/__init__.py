"""Planning: pair tensors, decide rules, lay out shards and units. Reads headers only, runs nothing."""
