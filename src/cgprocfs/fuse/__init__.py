"""Our own FUSE protocol loop: the kernel ABI, the shared arena, the workers and the
supervisor that holds the connection across worker generations."""
