"""Call features: one module per behaviour a call can have (see `base.Feature`)."""
