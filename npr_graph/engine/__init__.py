"""The parallel executor: paged KV, lanes, scheduler, model runner."""
