"""Throughput benchmarks for pear_mqtt against raw paho-mqtt and mosquitto's C clients.

Run ``python -m bench --quick`` (about a minute) or ``python -m bench`` (the full run). Every
measurement starts from a freshly started mosquitto with the project's rendered mutual-TLS
configuration; publisher and subscriber run in separate processes. Results go to
``bench/results.json`` and a table on stdout; ``docs/BENCHMARKS.md`` is rewritten from them.

Measurements (each repeated, reported as min / median / max):

- ``A``: raw paho-mqtt at its best, QoS 1, 500-byte payloads, delivered msgs/s at a subscriber;
- ``C``: ``mosquitto_pub -l -M 1000`` into ``mosquitto_sub -C N``, same listener and payloads;
- ``P``: ``PearNetwork.broadcast_market_insight`` under the consortium policy into a receiving
  ``PearNetwork``: verified insights/s delivered;
- ``sync``: a late joiner's ``PearNetwork.sync()`` of N retained states vs a raw paho
  subscriber (and ``mosquitto_sub``) receiving the same N retained messages;
- ``publish_retained``: pear publishing N retained states vs raw paho publishing N retained
  messages of the same size.
"""
