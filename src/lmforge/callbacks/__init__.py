"""Lightning callbacks: performance metrics (tokens/s, MFU, memory) and sample generations."""
