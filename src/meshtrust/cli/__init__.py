"""The command line: argument parsing and output, and nothing else."""
