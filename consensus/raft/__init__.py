"""Everything that knows pysyncobj: adapter, transport, journal, wire codec and snapshots."""
