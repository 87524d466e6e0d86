"""Cluster mode: several replicas on etcd. One holds the leader lease and acts; every member
probes its share of the masters; a master is failed when a quorum of its observers agree."""
