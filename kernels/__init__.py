"""Triton kernels for attention over mixed-tier (fp16 / packed INT4 / packed INT2) KV."""
