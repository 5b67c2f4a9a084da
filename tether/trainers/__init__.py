"""Training loops, one per method; each a short top-to-bottom function over tether.ops math."""
