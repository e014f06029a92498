"""The client library: connection, modules, pipelines, LoRAs on pipelines."""
