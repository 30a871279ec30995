"""Head-level families: mechanisms that change what each attention head computes."""
