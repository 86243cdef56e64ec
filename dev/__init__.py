"""Development tools beside the product (not installed): the throwaway VMs of the tests, the
demo and the benchmark, and the generator of the man page and the shell completion."""
