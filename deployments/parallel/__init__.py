"""Several GPUs for one request: the ``gpu.parallel`` config and rank layout (torch-free), one rank's
process group and pipeline split, and the replica that drives N rank processes."""
