"""User simulation: click response models, sessions with leaving and returning, and the A/B harness."""
