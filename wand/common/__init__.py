"""What both sides speak: errors, specs, manifests, dtypes, placement, protocol, fd socket."""
