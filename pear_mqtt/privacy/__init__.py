"""What may leave a node: sharing levels, pseudonyms, k-anonymous aggregation."""
