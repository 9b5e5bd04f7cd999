"""Running the network: broker configs, the embedded broker, Compose, and `pear-mqtt up`."""
