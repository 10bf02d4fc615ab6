"""The Redis contract: key layout, server scripts, vector encoding, batch reads and writes."""
