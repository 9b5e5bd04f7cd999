"""The public bridge: admits sealed contributions, aggregates them, publishes with receipts."""
