"""The GPU replica: the Serve deployment (one GPU, or N through ``parallel``), its cold start, its log
policy and its metrics (and the LoRA cache actor's)."""
