"""Generation jobs: many prompts, many images, resumable, on one process or many (accelerate)."""
