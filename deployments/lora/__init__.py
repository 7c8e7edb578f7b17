"""LoRAs: reference checks (torch-free, for the ingress), the per-node disk cache and its actor, reading
and checking safetensors files, writing sample and test LoRAs."""
