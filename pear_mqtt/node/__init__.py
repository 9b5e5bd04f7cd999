"""A store node on the network: PearNetwork (asyncio) as a facade over its collaborators
(sender and checkpoint pages, receiver, peer table, streams, connection supervisor),
SyncPearNetwork, and the outbox."""
