"""A network's broker as a 2-node aedes cluster on redis (deploy/cluster/README.md):
``render`` writes each node's configuration from the generated ACL, ``run`` starts redis and
the nodes as processes of this machine."""
