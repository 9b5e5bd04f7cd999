"""pear_mqtt: privacy-preserving market-insight sharing between retailers over MQTT."""
