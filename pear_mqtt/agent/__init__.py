"""The edge store agent: insights from files, a watched folder or a simulation, broadcast."""
