"""The embedded broker: amqtt with the identity, ACL and revocation of the mosquitto setup."""
