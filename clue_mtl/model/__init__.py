"""The network: encoders (hub, offline, trimmed vocabularies), frozen lower layers, task features, heads, private layers, and the multi-task model that joins them."""
