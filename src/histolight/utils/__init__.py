"""Small shared helpers: one `instantiate` path for Hydra objects, W&B mode handling, seeding."""
