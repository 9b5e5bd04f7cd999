"""``pear-mqtt up``: the whole topology (three networks, brokers, bridge, simulated stores) on
loopback, behind one Backend interface that mosquitto, amqtt and Compose implement."""
