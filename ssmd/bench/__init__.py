"""`ssmd bench`: throughput, latency, warm rate and memory, each beside a ceiling from the same run."""
