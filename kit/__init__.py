"""The kit's helpers, one fact per module; the scripts a user runs stay at the top level."""
