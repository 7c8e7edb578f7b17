"""HTTP floor of the Wan 2.1 I2V service: API, jobs, wiring. Stands on ``deployments``."""
