"""What the network carries: insight and status models, topics, the bridge's wire types."""
