"""The README's main job: a server on the bundled demo model with environment workers against it."""
