"""Process resources: the memory budget and stream cap, the allocator, logging setup."""
