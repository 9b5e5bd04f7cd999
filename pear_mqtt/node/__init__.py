"""A store node on the network: PearNetwork (asyncio) and SyncPearNetwork, its outbox."""
